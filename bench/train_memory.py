"""Peak memory and time per step of full-parameter training that fits in less memory (issue 21).

Rows (each in a fresh subprocess, so one row's peak cannot carry into the next):

  full            method.kind full: every parameter, AdamW
  lora-r8         LoRA r 8 on every attention/MLP matrix of the blocks
  qlora-r8        the same on a 4-bit NF4 base (bitsandbytes on CPU)
  lisa-frozen     LISA, gamma 2 blocks, always_train [norms]: embeddings and head frozen
  lisa            LISA, gamma 2 blocks, always_train embeddings, head, norms (LISA's default)
  galore-r64      GaLore r 64 on every attention/MLP matrix, the rest with AdamW (no plan)
  galore-planned  GaLore, ranks from an adaptive-rank plan (every block matrix, ranks 16..128);
                  a rank plan is read as under LoRA, so the embeddings and head are frozen
  galore-r64-plan GaLore r 64 from a layer-pattern uniform plan: the planned row's like-for-like
  mezo            MeZO, forward-only SPSA
  eval            no training: the same batches through the model in eval mode under no_grad
                  (the reference for MeZO's target)

All through ``spectune.train.run.run`` (eval through the same loader and collator), on the
built-in Shakespeare data at ``--batch-size`` x ``--max-length`` tokens for ``--steps``
optimizer steps, LISA redrawing its blocks every step (interval_steps 1), so an optimizer that
kept old blocks' state would climb towards full fine-tuning's within the run. Evaluation,
checkpoints, spectral tracking and the final model are off.

What is measured, in the child:
  peak_mb        the training window's peak RSS: /proc/self/clear_refs reset at on_train_begin
                 (after glibc's free heap is trimmed), VmHWM read at on_train_end
                 (``spectune._memory``); with CUDA also torch.cuda.max_memory_allocated
  seconds_per_step  ``spectune.train.cost.CostCallback`` (summary.json): mean wall time of an
                 optimizer step, the first step left out; the same figure compare's cost columns show
  the peak split into:
    weights      bytes of the model's parameters as they are held (4-bit packed for QLoRA)
    gradients    largest total of ``.grad`` bytes at on_pre_optimizer_step (all gradients alive)
    optimizer    largest total of the optimizer's state tensors after a step
                 (``_memory.optimizer_state_mb``) plus GaLore's projection matrices
    activations  largest total of the tensors autograd saved for backward in one step
                 (``torch.autograd.graph.saved_tensors_hooks``; unique storages, parameters
                 excluded): what the forward keeps alive until the backward
    rest         peak - the four: the imports and runtime, the tokenized data, transient
                 buffers (the loss's logits and softmax, the backward's temporaries) and allocator slack
  other_load_cores  cores other processes kept busy during the row (/proc/stat minus this
                 process, as bench/train_overhead.py measures it): the machine is shared

MiniLM (``--models minilm``) trains on TREC questions instead, through the classification recipe
(the eval row is causal-LM only); the TREC bake-off's setting is ``--batch-size 16 --max-length 48``.

Usage:
  .venv/bin/python bench/train_memory.py                                  # both models, every row
  .venv/bin/python bench/train_memory.py --models smollm2-135m --rows full lora-r8 lisa
  .venv/bin/python bench/train_memory.py --models minilm --rows full lora-r8 lisa galore-r64 \
      --batch-size 16 --max-length 48 --out bench/results/train_memory_minilm.json
Results: a markdown table on stdout and bench/results/train_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from train_overhead import _busy_s, _git, _machine, _own_cpu_s  # noqa: E402  (the shared bench helpers)

LORA = {"kind": "lora", "r": 8, "lora_alpha": 16}
PLANNED = {"policy": "adaptive-rank", "replan": "never",
           "params": {"min_rank": 16, "max_rank": 128, "top_fraction": 1.0}}
ROWS: dict[str, dict[str, Any]] = {
    "full": {"method": {"kind": "full"}},
    "lora-r8": {"method": LORA},
    "qlora-r8": {"method": {**LORA, "kind": "qlora"}},
    "lisa-frozen": {"method": {"kind": "lisa", "layers": 2, "interval_steps": 1, "always_train": ["norms"]}},
    "lisa": {"method": {"kind": "lisa", "layers": 2, "interval_steps": 1}},
    "galore-r64": {"method": {"kind": "galore", "rank": 64}},
    "galore-planned": {"method": {"kind": "galore"}, "plan": PLANNED},
    "galore-r64-plan": {"method": {"kind": "galore"},
                        "plan": {"policy": "layer-pattern", "replan": "never", "params": {"pattern": "uniform", "rank": 64}}},
    "mezo": {"method": {"kind": "mezo"}},
    "eval": {},
}
TARGETS = {"lisa_frozen_vs_lora": 1.1, "lisa_trained_slack": 1.2, "mezo_vs_eval": 1.15}
ADAMW_BYTES = 12  # gradient + two fp32 moments a parameter: what training a parameter with AdamW adds


# ------------------------------------------------------------------------------------- child side


# the built-in data each model trains on here: the causal LMs on plain text, the encoder on 256 TREC questions
# (the bake-off's training set)
DATA = {"minilm": "trec"}


def _config(model: str, row: dict[str, Any], opts: dict[str, Any], out: str) -> Any:
    from spectune.train.config import load_config

    return load_config({
        "model": {"name": model, "max_length": opts["max_length"]},
        "data": {"name": DATA.get(model, "shakespeare"), "max_examples": 256 if model in DATA else 16,
                 "max_eval_examples": 4, "seed": 0},
        "method": row.get("method", {"kind": "full"}),
        "plan": row.get("plan", {"policy": None, "replan": "never"}),
        "train": {"max_steps": opts["steps"], "batch_size": opts["batch_size"], "lr": 1e-5, "seed": 0},
        "eval": {"every": "no", "final_splits": []},
        "output": {"dir": out, "save_every": "no", "save_final": False},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False, "track_metrics": []},
    })


def _mb(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _state_mb(optimizer: Any) -> float:
    """The optimizer's state tensors, plus GaLore's projection matrices (kept in a projector object, not a tensor)."""
    from spectune import _memory

    from spectune.train.methods.lisa import inner_optimizer

    extra = []
    for s in inner_optimizer(optimizer).state.values():
        ortho = getattr(s.get("projector"), "ortho_matrix", None) if isinstance(s, dict) else None
        extra += ortho if isinstance(ortho, list) else [ortho] if ortho is not None else []
    return _memory.optimizer_state_mb(optimizer) + _mb(extra)


def probe_class() -> type:
    """A TrainerCallback that splits a training window's peak into its parts (module docstring)."""
    import torch
    from transformers import TrainerCallback

    from spectune import _memory

    class MemoryProbe(TrainerCallback):
        def __init__(self) -> None:
            self.rec: dict[str, Any] = {"grads_mb": 0.0, "state_mb": 0.0, "saved_mb": 0.0, "rss_steps_mb": []}
            self.trained_every_step: set[int] | None = None
            self._hooks: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.model = model
            self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
            _memory.release_free_heap()
            self.rec.update(load_peak_mb=_memory.peak_rss_mb(), start_rss_mb=_rss_mb(),
                            weights_mb=_mb({id(p): p for p in model.parameters()}.values()))
            _memory.reset_peak()
            _memory.reset_cuda_peak()
            self.t0, self.busy0, self.cpu0 = time.perf_counter(), _busy_s(), _own_cpu_s()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.saved: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.param_ptrs:
                    self.saved[storage.data_ptr()] = storage.nbytes()
                return t

            self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            self._hooks.__enter__()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._hooks.__exit__(None, None, None)
            grads = [p for p in self.model.parameters() if p.grad is not None]
            self.rec["grads_mb"] = max(self.rec["grads_mb"], _mb(p.grad for p in grads))
            self.rec["saved_mb"] = max(self.rec["saved_mb"], sum(self.saved.values()) / 2**20)
            ids = {id(p) for p in grads}
            self.trained_every_step = ids if self.trained_every_step is None else self.trained_every_step & ids

        def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            self.rec["state_mb"] = max(self.rec["state_mb"], _state_mb(optimizer))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.rec["rss_steps_mb"].append(_rss_mb())

        def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            wall = time.perf_counter() - self.t0
            always = self.trained_every_step or set()
            self.rec.update(peak_mb=_memory.peak_rss_mb(), cuda_peak_mb=_memory.cuda_peak_mb(),
                            other_load_cores=max(0.0, (_busy_s() - self.busy0) - (_own_cpu_s() - self.cpu0)) / wall,
                            always_trained_parameters=sum(p.numel() for p in self.model.parameters() if id(p) in always),
                            galore=_galore_ratios(self.model, optimizer))

    return MemoryProbe


def _galore_ratios(model: Any, optimizer: Any) -> list[dict[str, Any]] | None:
    """Per projected matrix: its rank, AdamW's state (2mn) and the state held, counted from the state tensors."""
    from spectune.train.methods.lisa import inner_optimizer

    opt = inner_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in opt.param_groups:
        if "rank" not in g:
            continue
        p = g["params"][0]
        s = opt.state.get(p, {})
        held = sum(s[k].numel() for k in ("exp_avg", "exp_avg_sq") if k in s)
        out.append({"name": names[id(p)], "rank": g["rank"], "shape": list(p.shape), "adamw": 2 * p.numel(),
                    "held": held, "bound": g["rank"] / min(p.shape)})
    return out or None


def _child_train(model: str, row: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    from spectune.train.run import run

    work = tempfile.mkdtemp(prefix="spectune-bench-mem-")
    probe = probe_class()()
    run(_config(model, row, opts, work), extra_callbacks=[probe])
    summary = json.loads((Path(work) / "summary.json").read_text())
    return {**probe.rec, **{k: summary.get(k) for k in ("seconds_per_step", "optimizer_state_parameters",
                                                         "trainable_parameters", "total_parameters", "global_step")}}


def _child_eval(model: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The reference for MeZO: the same batches, forward only, through the same loader, collator and imports."""
    import torch

    from spectune import _memory
    from spectune.train import run as _run  # noqa: F401  (the training run's imports, as the other rows have)
    from spectune.train.data import load_data
    from spectune.train.model import load_model
    from spectune.train.recipes import causal_lm

    cfg = _config(model, {}, opts, tempfile.mkdtemp(prefix="spectune-bench-mem-"))
    splits = load_data(cfg.data)
    net, tok = load_model(cfg, "causal_lm", None)
    data, _ = causal_lm.inputs(splits, tok, cfg)
    loader = torch.utils.data.DataLoader(data["train"], batch_size=opts["batch_size"], collate_fn=causal_lm.collator(tok))
    net.eval()
    _memory.release_free_heap()
    rec = {"start_rss_mb": _rss_mb(), "weights_mb": _mb(net.parameters())}
    _memory.reset_peak()
    times, busy0, cpu0, t0 = [], _busy_s(), _own_cpu_s(), time.perf_counter()
    with torch.no_grad():
        for _, batch in zip(range(opts["steps"]), loader):
            t = time.perf_counter()
            net(**batch).loss.item()
            times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    rec.update(peak_mb=_memory.peak_rss_mb(), seconds_per_step=sum(times[1:]) / max(len(times) - 1, 1),
               grads_mb=0.0, state_mb=0.0, saved_mb=0.0, global_step=len(times),
               other_load_cores=max(0.0, (_busy_s() - busy0) - (_own_cpu_s() - cpu0)) / wall)
    return rec


def child(model: str, row_name: str, opts: dict[str, Any], out: str) -> None:
    import torch

    if row_name == "eval" and model in DATA:
        raise SystemExit(f"the eval row reads causal-LM batches; {model} trains on {DATA[model]}")

    torch.set_num_threads(opts["threads"])
    rec = _child_eval(model, opts) if row_name == "eval" else _child_train(model, ROWS[row_name], opts)
    rec["rest_mb"] = rec["peak_mb"] - rec["weights_mb"] - rec["grads_mb"] - rec["state_mb"] - rec["saved_mb"]
    Path(out).write_text(json.dumps(rec))


# ------------------------------------------------------------------------------------ parent side


def run_row(model: str, row: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One row in a fresh process; its record, or the error it ended with."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", model, row, json.dumps(opts), out],
                          capture_output=True, text=True)
    rec: dict[str, Any] = {"model": model, "row": row, "process_s": time.perf_counter() - t}
    if proc.returncode != 0:
        return {**rec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return {**rec, **json.loads(Path(out).read_text())}


def targets(recs: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for each model, met or missed by how much."""
    lines = []
    for model in sorted({r["model"] for r in recs}):
        by = {r["row"]: r for r in recs if r["model"] == model and "error" not in r}

        def check(name: str, got: float, limit: float, what: str) -> None:
            verdict = "met" if got <= limit else f"MISSED by {got - limit:.0f} MB ({got / limit - 1:+.1%})"
            lines.append(f"{model}: {name}: {got:.0f} MB against at most {limit:.0f} MB ({what}): {verdict}")

        if "lora-r8" in by and "lisa-frozen" in by:
            check("LISA, embeddings and head frozen", by["lisa-frozen"]["peak_mb"],
                  TARGETS["lisa_frozen_vs_lora"] * by["lora-r8"]["peak_mb"], "1.1 x LoRA r8's peak")
        if "lora-r8" in by and "lisa" in by:
            extra = TARGETS["lisa_trained_slack"] * ADAMW_BYTES * by["lisa"]["always_trained_parameters"] / 2**20
            check("LISA, embeddings and head trained", by["lisa"]["peak_mb"], by["lora-r8"]["peak_mb"] + extra,
                  f"LoRA r8's peak + 1.2 x 12 bytes x {by['lisa']['always_trained_parameters']:,} always-trained parameters")
        for row in ("galore-r64", "galore-planned", "galore-r64-plan"):
            mats = (by.get(row) or {}).get("galore") or []
            if mats:
                worst = max(m["held"] / m["adamw"] / m["bound"] for m in mats)
                lines.append(f"{model}: {row}: state of the {len(mats)} projected matrices at most "
                             f"{worst:.3f} x r/min(m,n) of AdamW's: {'met' if worst <= 1 + 1e-9 else 'MISSED'}")
        if "mezo" in by and "eval" in by:
            check("MeZO", by["mezo"]["peak_mb"], TARGETS["mezo_vs_eval"] * by["eval"]["peak_mb"],
                  "1.15 x an evaluation pass at the same batch")
    return lines


def table(recs: list[dict[str, Any]]) -> str:
    head = ("| model | row | peak RSS MB | weights | gradients | optimizer | activations | rest | s/step | "
            "trainable params | other load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in recs:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['row']} | failed: {r['error'][:80]} |||||||||")
            continue
        cells = [r["model"], r["row"], f"{r['peak_mb']:,.0f}"] + [f"{r[k]:,.0f}" for k in (
            "weights_mb", "grads_mb", "state_mb", "saved_mb", "rest_mb")]
        cells += [f"{r['seconds_per_step']:.2f}", f"{r.get('trainable_parameters') or 0:,}",
                  f"{r['other_load_cores']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "ROW", "OPTS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "train_memory.json")
    a = ap.parse_args()
    if a.child:
        model, row, opts, out = a.child
        child(model, row, json.loads(opts), out)
        return
    opts = {"steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length, "threads": a.threads}
    started, recs = time.strftime("%Y-%m-%dT%H:%M:%S%z"), []
    for model in a.models:
        for row in a.rows:
            recs.append(run_row(model, row, opts))
            r = recs[-1]
            print(f"{model} {row}: " + (r["error"] if "error" in r else
                  f"peak {r['peak_mb']:.0f} MB, {r['seconds_per_step']:.2f} s/step ({r['process_s']:.0f} s)"), flush=True)
    result = {"command": "python bench/train_memory.py " + " ".join(sys.argv[1:]), "started": started, "options": opts,
              "machine": _machine(), "git": _git(), "rows": recs, "targets": targets(recs)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print("\n" + table(recs) + "\n\n" + "\n".join(result["targets"]) + f"\n\nwrote {a.out}")


if __name__ == "__main__":
    main()
