"""A whole comparison: the grid, then the statistics and the report (what ``spectune compare`` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from spectune.compare.config import CompareConfig
from spectune.compare.grid import Cell, run_grid
from spectune.compare.markdown import write_markdown
from spectune.compare.report import comparison_tables, write_report
from spectune.compare.search import SearchPerTask, SearchResult, run_search, storage


@dataclass
class Comparison:
    results: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    report: Path
    search: SearchResult | None = None
    advice: list[str] = field(default_factory=list)  # what to run, one line per task and memory budget
    exported: list[str] = field(default_factory=list)  # --export-best: one line per task


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
            workers: int = 1, report_only: bool = False, budgets_mb: list[float] | None = None,
            export_dir: str | Path | None = None) -> Comparison:
    """Search (when configured), run (or resume) every final cell, then write tables, plots and ``report.html``.

    ``on_line`` receives one line per finished search trial and per helper that dies; ``workers`` > 1
    starts that many processes in all (helpers share trials and cells through the output folder, one
    thread each); ``report_only`` trains nothing: the tables and report of what has finished so far.
    ``budgets_mb`` are the memory budgets the recommendation answers (none: along the whole front);
    ``export_dir`` receives each task's recommended config (within the first budget).
    """
    search = None
    if report_only:
        with quiet_libraries():
            if cfg.search is not None:
                search = run_search(cfg, read_only=True)
            df = run_grid(cfg, progress=False, chosen=search.values if search else None, train=False)
        return _write(cfg, df, command, search, budgets_mb, export_dir)
    if cfg.search is not None:
        storage(cfg)  # a storage that cannot be opened stops here, in one line, before any helper starts
    with quiet_libraries(), helpers(cfg, workers - 1, on_line) as procs:
        df = run_grid(cfg, progress=progress, on_cell=on_cell, chosen=_chosen(cfg, on_line))
        if cfg.search is not None:
            search = run_search(cfg, on_line=on_line)  # every study is spent by now: this gathers the record
        for proc in procs:
            proc.wait()
    return _write(cfg, df, command, search, budgets_mb, export_dir)


def _write(cfg: CompareConfig, df: pd.DataFrame, command: str | None, search: SearchResult | None,
           budgets_mb: list[float] | None = None, export_dir: str | Path | None = None) -> Comparison:
    from spectune.compare.export import export_best
    from spectune.compare.pareto import recommendations

    tables = comparison_tables(df, cfg)
    advice = recommendations(tables["front"], budgets_mb)
    report = write_report(df, cfg, cfg.output_dir, command=command, tables=tables, search=search, advice=advice)
    write_markdown(df, cfg, cfg.output_dir, command=command, tables=tables, search=search, advice=advice)
    exported = export_best(cfg, tables["front"], export_dir, (budgets_mb or [None])[0], search) if export_dir else []
    return Comparison(results=df, tables=tables, report=report, search=search, advice=advice, exported=exported)


def work(cfg: CompareConfig) -> None:
    """A helper process: take part in the search, then train the final cells no other process holds; no report."""
    with quiet_libraries():
        run_grid(cfg, progress=False, chosen=_chosen(cfg, None), wait=False)


def _chosen(cfg: CompareConfig, on_line: Callable[[str], None] | None) -> Callable[[str, str], dict | None] | None:
    """The searched values of a cell's task and method, each task's search run when its first cell needs it."""
    return SearchPerTask(cfg, on_line).values if cfg.search is not None else None


@contextmanager
def helpers(cfg: CompareConfig, n: int, on_line: Callable[[str], None] | None = None
            ) -> Iterator[list[subprocess.Popen]]:  # type: ignore[type-arg]
    """``n`` helper processes (``spectune compare --worker``) on the same comparison and output folder.

    Each runs one torch thread, and so does this process once it has helpers: on a small
    machine, N single-threaded cells side by side beat one N-threaded cell. Their output
    goes to ``worker-<i>.log`` in the output folder; they are stopped if this process stops.
    A watcher reaps a helper the moment it dies and says which one and why (``on_line``):
    a reaped helper's trial or cell claim is stale at once, and the remaining processes
    take it over at their next trial or cell. A dead helper is not restarted (an
    out-of-memory kill would only repeat).
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
    watch = HelperWatch(procs, out, on_line or (lambda text: print(text, file=sys.stderr)))
    try:
        with watch:
            yield procs
    finally:
        torch.set_num_threads(threads)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


class HelperWatch:
    """Polls the helpers from a daemon thread: reaps one as soon as it exits and reports a death once.

    Without reaping, a killed helper stays a zombie until the grid ends, and its claims look held.
    """

    def __init__(self, procs: list[subprocess.Popen], out: Path, say: Callable[[str], None],  # type: ignore[type-arg]
                 every: float = 0.5) -> None:
        from spectune._claim import Heartbeat

        self.procs, self.out, self.say = procs, out, say
        self.reported: set[int] = set()
        self.beat = Heartbeat(self.check, every)

    def check(self) -> None:
        for i, proc in enumerate(self.procs):
            code = proc.poll()  # reaps it
            if code is None or code == 0 or i in self.reported:
                continue
            self.reported.add(i)
            self.say(f"worker {i + 1} (pid {proc.pid}) stopped: {exit_reason(code)}; the other processes take over its "
                     f"trial or cell (log: {self.out / f'worker-{i + 1}.log'})")

    def __enter__(self) -> "HelperWatch":
        self.beat.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.beat.__exit__(*exc)
        self.check()


def exit_reason(code: int) -> str:
    """A child's return code in words (negative: the signal that ended it)."""
    import signal

    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (what the kernel's out-of-memory killer sends)" if name == "SIGKILL" else ""
    return f"killed by {name}{hint}"


def search_only(cfg: CompareConfig, on_line: Callable[[str], None] | None = None) -> SearchResult:
    """One search worker: claim trials until every study's budget is spent, without waiting for the others."""
    if cfg.search is None:
        raise ValueError("this comparison has no search section")
    storage(cfg)
    with quiet_libraries():
        return run_search(cfg, on_line=on_line, wait=False)
