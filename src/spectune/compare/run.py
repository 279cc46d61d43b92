"""A whole comparison: the grid, then the statistics and the report (what ``spectune compare`` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from spectune.compare.config import CompareConfig
from spectune.compare.grid import Cell, run_grid
from spectune.compare.report import comparison_tables, write_markdown, write_report
from spectune.compare.search import SearchPerTask, SearchResult, run_search


@dataclass
class Comparison:
    results: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    report: Path
    search: SearchResult | None = None


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence per-cell chatter (load reports, dataset map bars, the libraries' own Future/Deprecation/User
    warnings) under the grid's own progress bar and lines; spectune's warnings still show."""
    import warnings

    import datasets
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # spectune prints its own line per trial
    level = transformers.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    tf_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category,
                                        module=r"(torch|transformers|accelerate|peft|datasets|optuna|sklearn|pandas)(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning)  # a library's deprecation notice, never ours
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if tf_bars:
            transformers.utils.logging.enable_progress_bar()
        if bars:
            datasets.enable_progress_bars()


def compare(cfg: CompareConfig, progress: bool = True, command: str | None = None,
            on_line: Callable[[str], None] | None = None, on_cell: Callable[[Cell, dict], None] | None = None,
            workers: int = 1, report_only: bool = False) -> Comparison:
    """Search (when configured), run (or resume) every final cell, then write tables, plots and ``report.html``.

    ``on_line`` receives one line per finished search trial; ``workers`` > 1 starts that many
    processes in all (helpers share trials and cells through the output folder, one thread each);
    ``report_only`` trains nothing: the tables and report of what has finished so far.
    """
    search = None
    if report_only:
        with quiet_libraries():
            if cfg.search is not None:
                search = run_search(cfg, read_only=True)
            df = run_grid(cfg, progress=False, chosen=search.values if search else None, train=False)
        return _write(cfg, df, command, search)
    with quiet_libraries(), helpers(cfg, workers - 1) as procs:
        df = run_grid(cfg, progress=progress, on_cell=on_cell, chosen=_chosen(cfg, on_line))
        if cfg.search is not None:
            search = run_search(cfg, on_line=on_line)  # every study is spent by now: this gathers the record
        for proc in procs:
            proc.wait()
    return _write(cfg, df, command, search)


def _write(cfg: CompareConfig, df: pd.DataFrame, command: str | None, search: SearchResult | None) -> Comparison:
    tables = comparison_tables(df, cfg)
    report = write_report(df, cfg, cfg.output_dir, command=command, tables=tables, search=search)
    write_markdown(df, cfg, cfg.output_dir, command=command, tables=tables, search=search)
    return Comparison(results=df, tables=tables, report=report, search=search)


def work(cfg: CompareConfig) -> None:
    """A helper process: take part in the search, then train the final cells no other process holds; no report."""
    with quiet_libraries():
        run_grid(cfg, progress=False, chosen=_chosen(cfg, None), wait=False)


def _chosen(cfg: CompareConfig, on_line: Callable[[str], None] | None) -> Callable[[str, str], dict | None] | None:
    """The searched values of a cell's task and method, each task's search run when its first cell needs it."""
    return SearchPerTask(cfg, on_line).values if cfg.search is not None else None


@contextmanager
def helpers(cfg: CompareConfig, n: int) -> Iterator[list[subprocess.Popen]]:  # type: ignore[type-arg]
    """``n`` helper processes (``spectune compare --worker``) on the same comparison and output folder.

    Each runs one torch thread, and so does this process once it has helpers: on a small
    machine, N single-threaded cells side by side beat one N-threaded cell. Their output
    goes to ``worker-<i>.log`` in the output folder; they are stopped if this process stops.
    """
    if n <= 0:
        yield []
        return
    import torch

    from spectune import _io
    from spectune.compare.grid import config_yaml

    out = Path(cfg.output_dir)
    path = _io.write_text(out / "compare.yaml", config_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = []
    for i in range(n):
        log = open(out / f"worker-{i + 1}.log", "w")  # noqa: SIM115 - the child owns it for its lifetime
        procs.append(subprocess.Popen([sys.executable, "-m", "spectune.cli", "compare", str(path), "--worker"],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield procs
    finally:
        torch.set_num_threads(threads)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


def search_only(cfg: CompareConfig, on_line: Callable[[str], None] | None = None) -> SearchResult:
    """One search worker: claim trials until every study's budget is spent, without waiting for the others."""
    if cfg.search is None:
        raise ValueError("this comparison has no search section")
    with quiet_libraries():
        return run_search(cfg, on_line=on_line, wait=False)
