"""Where a training run's peak resident memory is set: the peak of each stage of ``spectune.train.run``.

A comparison cell records one peak for the whole run (``peak_memory_mb``). This splits it:
before each stage (data, model load, plan, method, Trainer, training, evaluation, saving,
summary) glibc's free heap is trimmed and VmHWM reset (``spectune._memory``), and the
stage's own peak is read when it returns. It answered why LoRA and full fine-tuning peak
alike on MiniLM (evaluation sets both peaks) and where PiSSA's extra memory on SmolLM2
appears (the init leaves it resident); docs/benchmarks.md and docs/results.md quote it.

Usage (any training config; a comparison's cells keep theirs under
``runs/<output_dir>/cells/<task>/<method>/seed-<n>/config.yaml``):
  OMP_NUM_THREADS=1 .venv/bin/python bench/stage_peaks.py CONFIG.yaml [CONFIG.yaml ...]
Prints one line per config: each stage's peak RSS in MB, in the order the stages ran.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

STAGES = ("data", "initial_plan", "method", "trainer", "train", "evaluate", "save", "summary")


def stage_peaks(config_path: str) -> list[tuple[str, float]]:
    """[(stage, peak MB)] of one run of ``config_path``, its output in a temporary folder."""
    import yaml

    from spectune import _memory
    from spectune.train import run as run_module
    from spectune.train import stages
    from spectune.train.config import load_config

    marks: list[tuple[str, float]] = []

    def measured(owner: Any, name: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _memory.release_free_heap()
            _memory.reset_peak()
            out = inner(*args, **kwargs)
            marks.append((name, _memory.peak_rss_mb()))
            return out

        setattr(owner, name, wrapper)

    originals = {n: getattr(stages, n) for n in STAGES} | {"load_model": run_module.load_model}
    try:
        for name in STAGES:
            measured(stages, name)
        measured(run_module, "load_model")
        data = yaml.safe_load(open(config_path))
        data.setdefault("output", {})["dir"] = tempfile.mkdtemp(prefix="spectune-stage-peaks-")
        run_module.run(load_config(data))
    finally:
        for name in STAGES:
            setattr(stages, name, originals[name])
        run_module.load_model = originals["load_model"]
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    for path in a.configs:
        print(path + ": " + ", ".join(f"{name} {mb:,.0f}" for name, mb in stage_peaks(path)), flush=True)


if __name__ == "__main__":
    main()
