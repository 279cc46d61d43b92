"""A whole comparison: the grid, then the statistics and the report (what ``spectune compare`` runs)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from spectune.compare.config import CompareConfig
from spectune.compare.grid import run_grid
from spectune.compare.report import analyse, write_markdown, write_report


@dataclass
class Comparison:
    results: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    report: Path


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence per-cell chatter (load reports, dataset map bars) under the grid's own progress bar."""
    import datasets
    import transformers

    level = transformers.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    tf_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if tf_bars:
            transformers.utils.logging.enable_progress_bar()
        if bars:
            datasets.enable_progress_bars()


def compare(cfg: CompareConfig, progress: bool = True, command: str | None = None) -> Comparison:
    """Run (or resume) every cell, then write tables, plots and ``report.html`` to ``cfg.output_dir``."""
    with quiet_libraries():
        df = run_grid(cfg, progress=progress)
    report = write_report(df, cfg, cfg.output_dir, command=command)
    write_markdown(df, cfg, cfg.output_dir, command=command)
    return Comparison(results=df, tables=analyse(df, cfg), report=report)
