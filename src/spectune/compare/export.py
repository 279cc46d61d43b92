"""``spectune compare --export-best DIR``: the recommended method's training config, ready for ``spectune train``.

Taking a comparison's winner away should not mean hunting through cell folders for the
searched values. Per task this writes ``DIR/<task>/``:

- ``config.yaml``: the full training config of the chosen method's final cell at the
  first final seed (base <- task <- method <- searched values <- seed, every default
  written out), so ``spectune train DIR/<task>/config.yaml`` trains exactly what that
  cell trained. Two keys differ: ``output.dir`` (``DIR/<task>/run``) and
  ``output.save_final: true`` (the cells keep no weights; a recipe taken away should);
  neither changes a metric;
- ``adapter_config.json`` for adapter methods: PEFT's config as the cell built it
  (targets, per-module ranks of a rank plan, initialisation), loadable with
  ``peft.PeftConfig.from_pretrained``;
- ``choice.json``: why this method (the recommendation line, its score and cost, the
  searched values, the seed).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from spectune import _io
from spectune.compare.config import CompareConfig, cell_data, cell_dir
from spectune.compare.grid import ADAPTER_CONFIG
from spectune.compare.pareto import choose, recommendation


def export_config(cfg: CompareConfig, task: str, method: str, out: Path, values: dict[str, Any] | None) -> Any:
    """The method's final-cell training config at the first final seed, written to run into ``out/run``."""
    from spectune.train import load_config

    data = cell_data(cfg, task, method, cfg.seeds[0], values)
    data["output"] = {**data["output"], "dir": str(out / "run"), "save_final": True}
    return load_config(data)


def export_best(cfg: CompareConfig, front: pd.DataFrame, out_dir: str | Path, budget_mb: float | None = None,
                search: Any = None) -> list[str]:
    """Write each task's recommended method (within ``budget_mb``) under ``out_dir``; returns one line per task."""
    lines = []
    for task in dict.fromkeys(front["task"]) if not front.empty else []:
        pick = choose(front, task, budget_mb)
        if pick is None:
            lines.append(f"{task}: nothing exported ({recommendation(front, task, budget_mb)})")
            continue
        method = str(pick["method"])
        out = Path(out_dir) / task
        values = search.values(task, method) if search is not None else None
        train_cfg = export_config(cfg, task, method, out, values)
        header = (f"# {cfg.name}: task {task}, method {method}, exported by spectune compare --export-best\n"
                  f"# the final cells' config at seed {cfg.seeds[0]}; train it with: spectune train {out / 'config.yaml'}\n")
        _io.write_text(out / "config.yaml", header + train_cfg.to_yaml())
        written = ["config.yaml"]
        recorded = cell_dir(cfg, task, method, cfg.seeds[0]) / ADAPTER_CONFIG
        (out / ADAPTER_CONFIG).unlink(missing_ok=True)
        if recorded.exists():
            shutil.copyfile(recorded, out / ADAPTER_CONFIG)
            written.append(ADAPTER_CONFIG)
        elif train_cfg.method.kind not in ("full", "frozen", "bitfit"):
            written.append(f"no {ADAPTER_CONFIG}: its cell was trained before spectune recorded one; training the "
                           "config writes it to run/final/")
        _io.write_json(out / "choice.json", {
            "task": task, "method": method, "recommendation": recommendation(front, task, budget_mb),
            "budget_mb": budget_mb, "metric": pick["metric"], "mean": pick["mean"], "ci": [pick["ci_low"], pick["ci_high"]],
            "peak_memory_mb": pick["memory_mb"], "memory_column": pick["memory_column"], "searched_values": values or {},
            "seed": cfg.seeds[0], "comparison": str(Path(cfg.output_dir) / "compare.yaml")})
        written.append("choice.json")
        lines.append(f"{task}: {method} -> {out}/ ({', '.join(written)})")
    return lines
