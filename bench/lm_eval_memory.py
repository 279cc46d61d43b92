"""Peak memory and time of causal-LM evaluation: the Trainer's path against spectune's per-token path (issue 15).

Two paths, each in a fresh subprocess per (model, eval batch):

  old   ``transformers.Trainer.evaluate`` with the arguments and collator spectune builds
        (what ``spectune train`` ran before issue 15): the model returns full float32
        logits for the batch (batch x tokens x vocab) and its loss takes a log-softmax of
        the same size; perplexity = exp(mean of per-batch token means)
  new   ``SpectralTrainer.evaluate`` (``spectune.train.evaluate.evaluate_lm``): the head
        is applied to the predicted positions a chunk at a time (eval.chunk_mb, 64 MiB of
        logits), perplexity = exp(total NLL / predicted tokens)

Models: SmolLM2-135M-Instruct (alias ``smollm2-135m``, vocabulary 49,152) and Gemma-3-270M (alias
``gemma3-270m``, vocabulary 262,144; both converted once from their packaged GGUF to an fp32
folder in the spectune cache by ``spectune.analyze.builtin``). Data: the first 64 blocks of the
built-in Shakespeare validation split (whole works held out), ``--tokens`` per block
(default 128 for SmolLM2; 64 for Gemma, where the old path at batch 64 would otherwise
need about 2 x 8.6 GB of logits on a 23 GB machine shared with other work).

Measured in the child (after the weights are made resident and one short warm-up forward):
peak RSS of the evaluation (the kernel's high-water mark, reset
with /proc/self/clear_refs just before ``evaluate``, read from VmHWM after it), the RSS
before it (model and data loaded), wall time of ``evaluate``, and loss / perplexity /
token count. Each child runs with ``--threads`` torch threads (default 1) and an
address-space limit (``--limit-gb``, default 16) so that an old-path run that would
exhaust the machine fails alone instead of pushing other processes out.

Usage:
  .venv/bin/python bench/lm_eval_memory.py                         # both models, batch 8 and 64, old and new
  .venv/bin/python bench/lm_eval_memory.py --models smollm2-135m --batches 8 64
Results: a markdown table on stdout and bench/results/lm_eval_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = {"smollm2-135m": 128, "gemma3-270m": 64}  # model -> default tokens per block
GOAL_RATIO = 1.25  # issue 15: peak memory at batch 64 within 25% of batch 8


# --- models -------------------------------------------------------------------------------------


def model_folder(name: str) -> Path:
    """An fp32 Hugging Face folder for the model: a spectune built-in alias, converted once into its cache."""
    from spectune.analyze.builtin import ALIASES, AliasUnavailable, resolve

    if name not in MODELS or name not in ALIASES:
        raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    try:
        return resolve(name)
    except AliasUnavailable as err:
        raise SystemExit(str(err)) from err


# --- child: one evaluation ----------------------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(opts: argparse.Namespace) -> dict[str, Any]:
    import math

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from spectune.train.config import TrainConfig
    from spectune.train.data import DataConfig, TextSplits, load_data
    from spectune.train.recipes import collator, tokenize
    from spectune.train.trainer import SpectralTrainer, training_arguments

    torch.set_num_threads(opts.threads)
    folder = model_folder(opts.model)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    val = load_data(DataConfig(name="shakespeare")).validation
    small = val.select(range(min(len(val), opts.rows)))  # each row (<= 2,000 characters) gives a few blocks
    empty = datasets.Dataset.from_dict({"text": ["x"]})
    splits = TextSplits("causal_lm", empty, small, empty, None, "shakespeare", "bench")
    ds = tokenize(splits, tok, opts.tokens)["validation"]
    ds = ds.select(range(min(len(ds), opts.rows)))
    cfg = TrainConfig.model_validate({"data": {"name": "shakespeare"}, "eval": {"batch_size": opts.batch},
                                      "logging": {"tensorboard": False, "progress": False}})
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(cfg, Path(tmp), total_steps=1)
        kw: dict[str, Any] = {"model": model, "args": args, "data_collator": collator("causal_lm", tok), "eval_dataset": ds}
        if opts.path == "old":
            trainer: Trainer = Trainer(**kw)
        else:
            trainer = SpectralTrainer(**kw, lm_eval=True, chunk_bytes=cfg.eval.chunk_mb * 2**20)
        with torch.no_grad():  # weights are memory-mapped: make them resident, and warm up, before measuring
            _ = [float(p.sum()) for p in model.parameters()]
            model(input_ids=torch.tensor([ds[0]["input_ids"][:4]]))
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark to the current RSS
        before = _status_mb("VmRSS")
        start = time.perf_counter()
        metrics = trainer.evaluate(ds, metric_key_prefix="eval")
        seconds = time.perf_counter() - start
        peak = _status_mb("VmHWM")
    tokens = metrics.get("eval_tokens")
    return {"model": opts.model, "path": opts.path, "batch": opts.batch, "rows": len(ds), "tokens_per_row": opts.tokens,
            "vocab": int(model.config.get_text_config().vocab_size), "padding_side": tok.padding_side,
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1), "increase_mb": round(peak - before, 1),
            "seconds": round(seconds, 2), "loss": metrics["eval_loss"],
            "perplexity": math.exp(metrics["eval_loss"]), "predicted_tokens": tokens,
            "method": metrics.get("eval_method", "trainer"), "torch_threads": torch.get_num_threads()}


# --- parent -------------------------------------------------------------------------------------


def _limit(gb: float) -> Any:
    def apply() -> None:
        size = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return apply


def measure(model: str, path: str, batch: int, opts: argparse.Namespace) -> dict[str, Any]:
    tokens = opts.tokens or MODELS[model]
    cmd = [sys.executable, __file__, "--child", "--model", model, "--path", path, "--batch", str(batch),
           "--tokens", str(tokens), "--rows", str(opts.rows), "--threads", str(opts.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_limit(opts.limit_gb))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model, "path": path, "batch": batch, "tokens_per_row": tokens,
                "error": f"exit {proc.returncode}: {tail[0][:200]} (address-space limit {opts.limit_gb} GB)"}
    return json.loads(lines[-1])


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | tokens/row | eval batch | path | peak RSS MB | eval increase MB | time s | perplexity | tokens |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['tokens_per_row']} | {r['batch']} | {r['path']} | failed: {r['error']} | | | | |")
            continue
        out.append(f"| {r['model']} | {r['tokens_per_row']} | {r['batch']} | {r['path']} | {r['peak_rss_mb']:.0f} | "
                   f"{r['increase_mb']:.0f} | {r['seconds']:.1f} | {r['perplexity']:.3f} | {r['predicted_tokens'] or ''} |")
    return "\n".join(out)


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Per model: batch 64 / batch 8 peak for each path, and new / old time."""
    lines = []
    ok = {(r["model"], r["path"], r["batch"]): r for r in rows if "error" not in r}
    for model in dict.fromkeys(r["model"] for r in rows):
        for path in ("old", "new"):
            a, b = ok.get((model, path, 8)), ok.get((model, path, 64))
            if a and b:
                ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
                goal = f" (goal <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'not met'})" if path == "new" else ""
                lines.append(f"{model} {path}: peak at batch 64 / batch 8 = {ratio:.2f}{goal}")
        for batch in (8, 64):
            o, n = ok.get((model, "old", batch)), ok.get((model, "new", batch))
            if o and n:
                lines.append(f"{model} batch {batch}: time new / old = {n['seconds'] / o['seconds']:.2f}, "
                             f"peak new / old = {n['peak_rss_mb'] / o['peak_rss_mb']:.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    ap.add_argument("--tokens", type=int, default=0, help="tokens per block (0: the model's default)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit-gb", type=float, default=16.0, help="address-space limit of each child")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        print(json.dumps(child(opts)), flush=True)
        return
    for model in opts.models:  # convert once, in a child of its own (the parent stays small)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); "
                        f"import lm_eval_memory as b; b.model_folder({model!r})"], check=True)
    rows = []
    for model in opts.models:
        for batch in opts.batches:
            for path in opts.paths:
                r = measure(model, path, batch, opts)
                rows.append(r)
                print(json.dumps(r), flush=True)
    text = table(rows) + "\n\n" + "\n".join(summarize(rows))
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lm_eval_memory.json").write_text(json.dumps(
        {"rows": rows, "summary": summarize(rows), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
         "options": {k: v for k, v in vars(opts).items() if k not in ("child", "model", "path", "batch")}}, indent=1))


if __name__ == "__main__":
    main()
