"""Running a comparison grid: cells one after another, finished cells kept, the table rewritten after each.

A cell is finished when its run folder holds ``summary.json`` (written last, and
atomically, by ``spectune.train``), so an interrupted grid resumes where it
stopped: finished cells are read back, a half-run cell resumes from its last
checkpoint when it saved one and starts over otherwise. A cell that fails (a
diverged loss, bad data) becomes a row with ``status=failed`` and its error; the
grid goes on, and a later run tries it again.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from rich.markup import escape

from spectune import _claim, _io, _memory
from spectune._config import first_difference, to_yaml
from spectune._progress import Bar
from spectune.compare.config import CompareConfig, cell_config, cell_dir

RESULTS = "results"  # results.parquet and results.csv in the output folder
FAILED_FILE = "failed.json"
# Identity columns first, then what a reader looks for; metric columns follow in sorted order.
ID_COLUMNS = ["task", "method", "seed", "status", "task_type", "method_kind", "policy"]
COST_COLUMNS = ["mean_lr_scale", "trainable_parameters", "trainable_parameters_active", "trainable_parameters_end",
                "total_parameters", "optimizer_state_parameters", "optimizer_state_mb", "wall_time_s", "train_runtime_s",
                "seconds_per_step", "analysis_time_s", "peak_memory_mb", "peak_gpu_memory_mb", "global_step"]
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT cell's adapter config as trained (what --export-best hands out)


class StaleCell(RuntimeError):
    """A cell folder holds a run of another config: reusing it would mix two experiments."""


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.task} / {self.method} / seed {self.seed}"


def cells(cfg: CompareConfig) -> list[Cell]:
    """Seed-major by default: after the first seed every method has one result, so a cut-short grid is still paired.

    Task-major (``order: task``) finishes a task, every seed and method, before the next.
    """
    if cfg.order == "task":
        return [Cell(t, m, s) for t in cfg.tasks for s in cfg.seeds for m in cfg.methods]
    return [Cell(t, m, s) for s in cfg.seeds for t in cfg.tasks for m in cfg.methods]


def row_from_summary(cell: Cell, summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "task": cell.task, "method": cell.method, "seed": cell.seed, "status": "ok",
        "task_type": summary.get("task"), "method_kind": summary.get("method"), "policy": summary.get("policy") or "",
    }
    for k in COST_COLUMNS:
        v = summary.get(k)
        row[k] = math.nan if v is None else v
    for k, v in (summary.get("metrics") or {}).items():
        if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_samples_per_second", "_steps_per_second")):
            row[k] = float(v)
    return row


def mean_lr_scale(folder: Path) -> float:
    """Mean per-matrix rate scale over the plans a run used (1 = the base rate everywhere).

    A plan whose scales sit mostly below 1 trains with a smaller effective rate than
    the uniform baseline; this column lets a reader see that before crediting or
    blaming the per-layer pattern.
    """
    import yaml

    means = []
    for path in sorted((folder / "plans").glob("*.yaml")):
        scales = list((yaml.safe_load(path.read_text()) or {}).get("lr_scale", {}).values())
        if scales:
            means.append(sum(scales) / len(scales))
    return sum(means) / len(means) if means else 1.0


def run_cell(cfg: CompareConfig, cell: Cell, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one cell (or read it back when finished) and return its row of the results table.

    ``values`` are the search's chosen values for the cell's task and method (dotted paths).
    """
    from spectune.train.checkpoints import CheckpointError
    from spectune.train.config import stored_config_yaml
    from spectune.train.checkpoints import last_checkpoint
    from spectune.train.run_folder import required_state

    folder = cell_dir(cfg, cell.task, cell.method, cell.seed)
    summary_path = folder / "summary.json"
    train_cfg = cell_config(cfg, cell.task, cell.method, cell.seed, values)
    stored = folder / "config.yaml"
    was = stored_config_yaml(stored.read_text()) if stored.exists() else None
    if was is not None and was != train_cfg.to_yaml():
        # an edited comparison must not silently reuse (or resume) cells trained under the old one
        raise StaleCell(
            f"{folder} was trained with a different config than the comparison now gives this cell "
            f"({first_difference(was, train_cfg.to_yaml())}); "
            "delete that folder to retrain it, or choose another output_dir"
        )
    if summary_path.exists():
        return _row(cell, json.loads(summary_path.read_text()), folder)
    try:
        resume = last_checkpoint(folder, required_state(train_cfg)) is not None
    except CheckpointError:
        resume = False  # no usable checkpoint: the cell starts over (its folder holds nothing else worth keeping)
    if folder.exists() and not resume:
        shutil.rmtree(folder)  # a cell cut short before its first checkpoint: nothing in it to keep
    t = time.perf_counter()
    try:
        if cfg.fresh_process:
            summary = train_measured_fresh(train_cfg, resume, folder)
        else:
            summary = train_measured(train_cfg, resume=resume, callbacks=[adapter_recorder(folder)])
    except Exception as err:  # noqa: BLE001 - one failed cell must not end the grid; the row says what happened
        msg = f"{type(err).__name__}: {err}"
        _io.write_json(folder / FAILED_FILE, {"error": msg, "traceback": traceback.format_exc()})
        return {"task": cell.task, "method": cell.method, "seed": cell.seed, "status": "failed", "error": msg,
                "wall_time_s": time.perf_counter() - t}
    (folder / FAILED_FILE).unlink(missing_ok=True)
    return _row(cell, summary, folder)


def train_measured(train_cfg: Any, resume: bool = False, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train one run with its peaks measured for it alone, and return its summary.json (written back with them).

    Cells and search trials share a long-lived process, whose lifetime peaks keep the
    biggest run's: the resident and CUDA peaks are reset before the run and read after
    it (loading, training and final evaluation). Step time and optimizer-state size are
    the training run's own (``spectune.train.cost.CostCallback``).
    """
    from spectune.train.run import run

    _memory.release_free_heap()
    _memory.reset_peak()
    _memory.reset_cuda_peak()
    run(train_cfg, resume=resume, extra_callbacks=list(callbacks or []))
    path = Path(train_cfg.output.dir) / "summary.json"
    summary = json.loads(path.read_text())
    summary["peak_memory_mb"] = _memory.peak_rss_mb()
    summary["peak_gpu_memory_mb"] = _memory.cuda_peak_mb()
    _io.write_json(path, summary)
    return summary  # type: ignore[no-any-return]


def _measured_cell(train_cfg: Any, resume: bool, folder: Path, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)  # the worker's share of the cores, not the machine's
    return train_measured(train_cfg, resume=resume, callbacks=[adapter_recorder(folder)])


def train_measured_fresh(train_cfg: Any, resume: bool, folder: Path) -> dict[str, Any]:
    """``train_measured`` in a new (spawned) Python process: its peak starts from the imports alone.

    A cell's peak in a long-lived worker also holds what earlier cells left in the
    heap; in its own process it is the cell's, comparable with bench/train_memory.py's
    rows. The child's exception comes back as the cell's error; a child killed from
    outside (out of memory) is a ``BrokenProcessPool``, which fails the cell alone.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(_measured_cell, train_cfg, resume, folder, torch.get_num_threads())
        return job.result()  # type: ignore[no-any-return]


def adapter_recorder(folder: Path) -> Any:
    """A Trainer callback that writes a PEFT model's adapter config (``adapter_config.json``) to ``folder``.

    Written when training begins, from the model as built (targets, per-module ranks of
    a rank plan, the initialisation), so the config a cell trained with can be handed
    out without its weights (``spectune compare --export-best``).
    """
    from transformers import TrainerCallback

    class AdapterConfigRecord(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            configs = getattr(model, "peft_config", None)
            if isinstance(configs, dict) and configs:
                folder.mkdir(parents=True, exist_ok=True)
                config = next(iter(configs.values())).to_dict()  # PEFT's own fields, as from_pretrained reads them
                _io.write_json(folder / ADAPTER_CONFIG, {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()})

    return AdapterConfigRecord()


def _row(cell: Cell, summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    row = row_from_summary(cell, summary)
    if row.get("mean_lr_scale") is None:  # runs from before the summary carried the parameter-weighted mean
        row["mean_lr_scale"] = mean_lr_scale(folder)
    return row


def tidy(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=ID_COLUMNS)
    first = [c for c in ID_COLUMNS + ["error"] if c in df]
    metric_cols = sorted(c for c in df if c not in first and c not in COST_COLUMNS)
    return df[first + metric_cols + [c for c in COST_COLUMNS if c in df]]


def save_results(df: pd.DataFrame, out_dir: str | Path) -> None:
    out = Path(out_dir)
    _io.write_parquet(out / f"{RESULTS}.parquet", df)
    _io.write_text(out / f"{RESULTS}.csv", df.to_csv(index=False))


def run_grid(cfg: CompareConfig, progress: bool = True,
             on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
             chosen: Callable[[str, str], dict[str, Any] | None] | None = None, wait: bool = True,
             train: bool = True) -> pd.DataFrame:
    """Every cell in order; the results table is rewritten after each, so it is never lost.

    ``chosen(task, method)`` gives the searched values a method's final cells train with;
    without ``wait`` (a helper process) cells other processes hold are left to them; without
    ``train`` only finished cells of this grid's configuration are read (a report of a grid still running, or cut short).
    Several processes may run the same comparison into one folder: each claims the
    cells no other holds (``seed-N.claim`` beside the cell folder), then waits for and
    reads the cells the others trained, so every process ends with the whole table.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _io.write_text(out / "compare.yaml", config_yaml(cfg))
    todo = cells(cfg)
    rows: dict[Cell, dict[str, Any]] = {}
    bar = Bar(progress, len(todo), "grid")

    def finish(cell: Cell, row: dict[str, Any]) -> None:
        rows[cell] = row
        save_results(tidy([rows[c] for c in todo if c in rows]), out)
        if on_cell is not None:
            on_cell(cell, row)
        if row.get("status") == "failed":  # names and errors are printed literally: a path may look like markup
            bar.note("[red]failed[/red] " + escape(f"{row['task']} / {row['method']} / seed {row['seed']}: {row['error']}"))
        bar.advance()

    with bar:
        pending = list(todo)
        while pending:
            others = []
            for cell in pending:
                if not train:
                    if _finished(cfg, cell):
                        try:
                            finish(cell, run_cell(cfg, cell, chosen(cell.task, cell.method) if chosen else None))
                        except StaleCell:
                            pass  # trained under other values (a search not finished yet): not this grid's cell
                    continue
                values = chosen(cell.task, cell.method) if chosen else None
                claim = claim_path(cfg, cell)
                if not _finished(cfg, cell) and not _claim.try_claim(claim, cfg.stale_after_s):
                    others.append(cell)  # another process trains it; read it when it is done
                    continue
                bar.describe(f"[bold]{escape(cell.label)}")
                try:
                    with _claim.Heartbeat(lambda: _claim.touch(claim), _claim.beat_every(cfg.stale_after_s)):
                        finish(cell, run_cell(cfg, cell, values))
                finally:
                    _claim.release(claim)
            ready = [c for c in others if not _claim.held(claim_path(cfg, c), cfg.stale_after_s)]
            for cell in ready:
                if _finished(cfg, cell) or not (cell_dir(cfg, cell.task, cell.method, cell.seed) / FAILED_FILE).exists():
                    continue  # trained (read next pass) or never started (claimed next pass)
                failed = json.loads((cell_dir(cfg, cell.task, cell.method, cell.seed) / FAILED_FILE).read_text())
                finish(cell, {"task": cell.task, "method": cell.method, "seed": cell.seed, "status": "failed",
                              "error": failed.get("error", "")})
            pending = [c for c in others if c not in rows] if wait and train else []
            if pending and len(pending) == len(others) and not ready:
                time.sleep(5)
    return tidy([rows[c] for c in todo if c in rows])


def claim_path(cfg: CompareConfig, cell: Cell) -> Path:
    folder = cell_dir(cfg, cell.task, cell.method, cell.seed)
    return folder.parent / f"{folder.name}.claim"


def _finished(cfg: CompareConfig, cell: Cell) -> bool:
    return (cell_dir(cfg, cell.task, cell.method, cell.seed) / "summary.json").exists()


def config_yaml(cfg: CompareConfig) -> str:
    return to_yaml(cfg)
