"""Equal-budget tuning inside a comparison: one Optuna study per task x method, on validation only.

Why it exists: a per-layer method is only better than a uniform baseline if both
had the same chance to find their rate. Every searched method of a task gets the
same number of trials; each trial trains on the search seeds (never the final
seeds) and is scored by the mean validation metric; its cells evaluate no test
split. The final seeds then train each method at its chosen values, and only
those cells read the test split.

Robustness, because searches are long and run on several processes:
- the Optuna storage lives in the output folder by default (a journal file,
  safe for several local processes), or at any URL the workers share;
- a trial is claimed through the storage: its number is assigned atomically,
  and a trial whose number comes after ``trials`` live ones, or whose values
  repeat a live trial's, is closed as failed with the reason and never trained,
  so no budget is overspent and nothing runs twice;
- a trial left running by a killed worker (same host and its process gone, or
  silent for ``stale_after_s``) is closed as failed and its values are queued
  again, so a killed search resumes with the same budget.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from spectune import _io
from spectune._claim import Heartbeat, beat_every, holder_gone, worker_id
from spectune.compare.config import METRIC_DIRECTION, CompareConfig, ParamSpace, cell_data, merge

SEARCH_DIR = "search"
CHOSEN_FILE = "chosen.json"
TRIALS_FILE = "trials.csv"
# reasons a trial is closed without training; they are bookkeeping, not results
SKIPPED = ("over budget", "duplicate")
# what trials.csv records of each trial's cost (from its runs' summary.json; NaN where a run predates the measure)
TRIAL_COSTS = ("peak_memory_mb", "peak_gpu_memory_mb", "seconds_per_step", "wall_time_s", "trainable_parameters",
               "trainable_parameters_active",
               "optimizer_state_parameters")


class SearchError(RuntimeError):
    """A search cannot go on (a trial failed for a reason other than a diverged loss)."""


# --- the space ----------------------------------------------------------------------------------


def searched_methods(cfg: CompareConfig) -> list[str]:
    assert cfg.search is not None
    return [m for m in cfg.methods if cfg.search.methods is None or m in cfg.search.methods]


def current_value(data: dict[str, Any], path: str) -> Any:
    """The value a cell's config has at a dotted path, or the policy's default for ``plan.params.*``."""
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            node = None
            break
        node = node[key]
    if node is not None:
        return node
    from spectune.train import load_config

    full = load_config(data).model_dump(mode="json")
    parts = path.split(".")
    if parts[:2] == ["plan", "params"] and len(parts) == 3 and full["plan"]["policy"]:
        from spectune.plan import policy_config

        return getattr(policy_config(full["plan"]["policy"], full["plan"]["params"]), parts[2], None)
    node = full
    for key in parts:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def method_space(cfg: CompareConfig, method: str) -> dict[str, ParamSpace]:
    assert cfg.search is not None
    return {**cfg.search.space, **cfg.search.spaces.get(method, {})}


def resolve_space(cfg: CompareConfig, task: str, method: str) -> dict[str, Any]:
    """Dotted path -> Optuna distribution (tpe) or list of values (grid), ratios made absolute."""
    import optuna.distributions as od

    assert cfg.search is not None
    data = cell_data(cfg, task, method, cfg.search.seeds[0])
    out: dict[str, Any] = {}
    for path, sp in method_space(cfg, method).items():
        if sp.choices is not None:
            out[path] = list(sp.choices) if cfg.search.sampler == "grid" else od.CategoricalDistribution(sp.choices)
            continue
        if sp.ratio is not None:
            base = current_value(data, path)
            if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
                raise ValueError(f"search space {path!r} of {method}: ratio needs a positive configured value, found {base!r}")
            low, high = base * sp.ratio[0], base * sp.ratio[1]
        else:
            low, high = float(sp.low), float(sp.high)  # type: ignore[arg-type]
        if cfg.search.sampler == "grid":
            if sp.points is None:
                raise ValueError(f"search space {path!r} of {method}: the grid sampler needs `points` (or `choices`)")
            grid = np.geomspace(low, high, sp.points) if sp.log else np.linspace(low, high, sp.points)
            out[path] = [float(f"{v:.6g}") for v in grid]
        else:
            out[path] = od.FloatDistribution(low, high, log=sp.log)
    return out


def grid_size(space: dict[str, Any]) -> int:
    return int(np.prod([len(v) for v in space.values()])) if space else 0


def check_search(cfg: CompareConfig) -> None:
    """Every searched path must give a valid cell at the ends of its range; a grid must fill the budget exactly."""
    from spectune._config import ConfigError
    from spectune.train import load_config

    assert cfg.search is not None
    for task in cfg.tasks:
        for method in searched_methods(cfg):
            try:
                space = resolve_space(cfg, task, method)
            except ValueError as err:
                raise ConfigError(f"search: task={task} method={method}: {err}") from None
            if cfg.search.sampler == "grid" and grid_size(space) != cfg.search.trials:
                raise ConfigError(
                    f"search: task={task} method={method}: the grid has {grid_size(space)} points but search.trials is "
                    f"{cfg.search.trials} (every method of a task gets the same budget: make them equal)")
            for end in (0, -1):
                values = {p: (d[end] if isinstance(d, list) else _end(d, end)) for p, d in space.items()}
                try:
                    load_config(cell_data(cfg, task, method, cfg.search.seeds[0], values))
                except ConfigError as err:
                    raise ConfigError(f"search: task={task} method={method} at {values}: {err}") from None


def _end(dist: Any, end: int) -> Any:
    if hasattr(dist, "choices"):
        return dist.choices[end]
    return dist.low if end == 0 else dist.high


# --- storage, studies and workers ----------------------------------------------------------------


def search_dir(cfg: CompareConfig) -> Path:
    return Path(cfg.output_dir) / SEARCH_DIR


class StorageError(SearchError):
    """``search.storage`` cannot be opened: one line naming the field, the cause and what to do."""


def storage(cfg: CompareConfig) -> Any:
    """The shared Optuna storage: an RDB URL as given, else a journal file (default: in the output folder)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    assert cfg.search is not None
    where = cfg.search.storage
    if where and "://" in where:
        return rdb_storage(where)
    path = Path(where) if where else search_dir(cfg) / "optuna.journal"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise StorageError(f"search.storage: cannot write the journal file {path} ({_folder_problem(path, err)}): give "
                           "a path in a folder this process can write") from None


def _folder_problem(path: Path, err: OSError) -> str:
    """Why a file's folder cannot be made: a file where a folder should be, or the system's reason."""
    for parent in path.parents:
        if parent.exists():
            return f"{parent} is a file, not a folder" if not parent.is_dir() else str(err.strerror or err)
    return str(err.strerror or err)


def rdb_url(url: str) -> str:
    """``postgresql://`` through psycopg 3 (``spectune[postgres]``) where it is installed and psycopg2 is not.

    SQLAlchemy's default PostgreSQL driver was psycopg2 before 2.1; a URL that names
    its driver (``postgresql+psycopg2://``) is kept as written.
    """
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is not None \
            and importlib.util.find_spec("psycopg2") is None:
        return f"postgresql+psycopg{sep}{rest}"
    return url


def rdb_storage(url: str) -> Any:
    """Optuna's RDB storage at ``url``; a missing driver, a server that cannot be reached or refuses, and an
    SQLite file that cannot be written each end in one ``StorageError`` line instead of a traceback."""
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    url = rdb_url(url)
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError as err:
        raise StorageError(f"search.storage: {url!r} is not a database URL ({err}): write dialect://user@host:port/db, "
                           "sqlite:///path.db, or a journal file path") from None
    shown = parsed.render_as_string(hide_password=True)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}  # an unreachable host fails in seconds
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        try:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(_storage_failure(shown, "sqlite", parsed.database,
                                                _folder_problem(Path(parsed.database), err))) from None
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except ImportError as err:
        missing = getattr(err.__cause__, "name", None) or "its driver"
        raise StorageError(f"search.storage: {shown} needs the database driver {missing!r}, which is not installed: "
                           "pip install 'spectune[postgres]' for PostgreSQL (postgresql:// or postgresql+psycopg://), "
                           "or install the driver the URL names") from None
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise StorageError(_storage_failure(shown, parsed.get_backend_name(), parsed.database, err)) from None


def _storage_failure(shown: str, backend: str, database: str | None, err: BaseException | str) -> str:
    orig = getattr(err, "orig", None) or err
    reason = " ".join(str(getattr(orig, "strerror", None) or orig).split()).split(" (Background on")[0]
    if backend == "sqlite":
        return (f"search.storage: cannot open the SQLite file {database} ({reason}): its folder must exist and be "
                "writable by this process; give another path, or leave search.storage unset (a journal file in the "
                "output folder)")
    return (f"search.storage: cannot connect to {shown} ({reason[:300]}): start the server, or fix the host, port, "
            "user, password or database name in the URL (every worker must reach it)")


def objective_metric(cfg: CompareConfig, task: str) -> str:
    """The validation metric a task's search optimises (without the ``validation_`` prefix)."""
    assert cfg.search is not None
    metric = cfg.search.objective if cfg.search.objective != "auto" else cfg.metric
    if metric != "auto":
        return metric
    return "accuracy" if task_type(cfg, task) == "classification" else "perplexity"


def task_type(cfg: CompareConfig, task: str) -> str:
    from spectune.train import load_config
    from spectune.train.data import BUILTIN, load_data

    tc = load_config(cell_data(cfg, task, next(iter(cfg.methods)), cfg.seeds[0]))
    if tc.model.task != "auto":
        return tc.model.task
    if tc.data.task is not None:
        return tc.data.task
    if tc.data.name is not None:
        return BUILTIN[tc.data.name].task
    return load_data(tc.data).task


def study_name(cfg: CompareConfig, task: str, method: str) -> str:
    return f"{cfg.name}/{task}/{method}"


def open_study(cfg: CompareConfig, task: str, method: str, store: Any = None) -> Any:
    import optuna

    assert cfg.search is not None
    metric = objective_metric(cfg, task)
    seed = zlib.crc32(f"{task}/{method}".encode())  # the same sampler stream in every worker and re-run
    space = resolve_space(cfg, task, method)
    if cfg.search.sampler == "grid":
        sampler: Any = grid_sampler(space, seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, cfg.search.trials // 2))
    if cfg.search.pruner == "median":
        pruner: Any = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1 if cfg.search.prune_on == "epoch" else 0)
    else:
        pruner = optuna.pruners.NopPruner()
    return optuna.create_study(
        storage=store if store is not None else storage(cfg), study_name=study_name(cfg, task, method),
        direction="maximize" if METRIC_DIRECTION[metric] else "minimize",
        sampler=sampler, pruner=pruner, load_if_exists=True,
    )


def grid_sampler(space: dict[str, Any], seed: int) -> Any:
    """Optuna's grid sampler without its stop-at-exhaustion hook: the budget check here decides when to stop
    (the hook calls ``Study.stop``, which only works inside ``optimize``)."""
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, *args: Any, **kw: Any) -> None:
            return None

    return Grid(space, seed=seed)


def is_stale(trial: Any, now: float, stale_after_s: float) -> bool:
    """A running trial whose worker is gone: same host and the process has exited, or silent too long."""
    if holder_gone(str(trial.user_attrs.get("worker", ""))):
        return True
    alive = trial.user_attrs.get("alive_at")
    return alive is not None and now - float(alive) > stale_after_s


def fail_stale(study: Any, stale_after_s: float) -> list[int]:
    """Close stale running trials as failed and queue their values again; returns their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = time.time()
    retried = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, now, stale_after_s):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "reason", "stale: its worker stopped")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):
            continue  # another worker closed it first, and queues its values
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        retried.append(t.number)
    return retried


def _live(study: Any, below: int | None = None, waiting: bool = False) -> list[Any]:
    """Trials that count against the budget (complete, pruned, running; waiting ones when asked)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) + ((TrialState.WAITING,) if waiting else ())
    return [t for t in study.get_trials(deepcopy=False, states=states) if below is None or t.number < below]


def _claim(study: Any, cfg: CompareConfig, space: dict[str, Any]) -> Any | None:
    """Ask for a trial the budget allows and no live trial already has; None when the budget is spent."""
    import optuna.distributions as od
    from optuna.trial import TrialState

    assert cfg.search is not None
    dists = {p: (od.CategoricalDistribution(v) if isinstance(v, list) else v) for p, v in space.items()}
    for _ in range(50):
        if len(_live(study, waiting=True)) >= cfg.search.trials and not _waiting(study):
            return None
        trial = study.ask(dists)
        earlier = _live(study, below=trial.number)
        reason = None
        if len(earlier) >= cfg.search.trials:
            reason = "over budget"
        elif any(t.params == trial.params for t in earlier):
            reason = "duplicate"
        if reason is None:
            trial.set_user_attr("worker", worker_id())
            return trial
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        if reason == "over budget":
            return None
    return None


def _waiting(study: Any) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


@dataclass
class TrialRunner:
    """Trains one trial's cells (every search seed) and returns its mean validation score."""

    cfg: CompareConfig
    task: str
    method: str
    metric: str

    def folder(self, number: int, seed: int) -> Path:
        return search_dir(self.cfg) / self.task / self.method / f"trial-{number}" / f"seed-{seed}"

    def __call__(self, trial: Any) -> float:
        import optuna

        from spectune.compare.grid import train_measured
        from spectune.train import load_config

        assert self.cfg.search is not None
        search = self.cfg.search
        scores: dict[str, float] = {}
        costs: list[dict[str, Any]] = []
        for i, seed in enumerate(search.seeds):
            folder = self.folder(trial.number, seed)
            summary = folder / "summary.json"
            data = cell_data(self.cfg, self.task, self.method, seed, dict(trial.params))
            extra: dict[str, Any] = {"output": {"dir": str(folder)}, "eval": {"final_splits": ["validation"]}}
            if search.prune_on == "epoch":
                extra["eval"]["every"] = "epoch"
            tc = load_config(merge(data, extra))
            callbacks = [epoch_reporter(trial, i, self.metric)] if search.prune_on == "epoch" else []
            if not summary.exists():
                if folder.exists():
                    shutil.rmtree(folder)  # a half-run search cell keeps no checkpoints: start it over
                train_measured(tc, callbacks=callbacks)  # peaks reset per run: a trial's cost is its own
            done = json.loads(summary.read_text())
            value = float(done["metrics"][f"validation_{self.metric}"])
            scores[str(seed)] = value
            costs.append({k: done.get(k) for k in TRIAL_COSTS})
            trial.set_user_attr("seed_values", scores)
            trial.set_user_attr("cost", trial_cost(costs))
            if search.prune_on == "seed" and i + 1 < len(search.seeds):
                trial.report(float(np.mean(list(scores.values()))), i)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return float(np.mean(list(scores.values())))


def trial_cost(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    """A trial's cost from its search seeds' runs: the highest peaks, the mean step time, the sizes (the same per seed)."""
    out: dict[str, float] = {}
    for k in TRIAL_COSTS:
        vals = [float(c[k]) for c in per_seed if c.get(k) is not None and math.isfinite(float(c[k]))]
        if vals:
            out[k] = max(vals) if k.startswith("peak_") else float(np.mean(vals))
    return out


def epoch_reporter(trial: Any, seed_index: int, metric: str) -> Any:
    """A Trainer callback that reports each epoch's validation metric to the trial and prunes on it."""
    import optuna
    from transformers import TrainerCallback

    class EpochReporter(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kw: Any) -> None:
            value = (metrics or {}).get(f"eval_{metric}")
            if value is None and metric == "perplexity" and metrics and "eval_loss" in metrics:
                value = math.exp(min(float(metrics["eval_loss"]), 50))
            if value is None:
                return
            trial.report(float(value), seed_index * 1000 + int(round(state.epoch or 0)))
            if trial.should_prune():
                raise optuna.TrialPruned()

    return EpochReporter()


def run_study(cfg: CompareConfig, task: str, method: str, on_line: Callable[[str], None] | None = None,
              wait: bool = True, store: Any = None) -> Any:
    """Work on one task x method study until its budget is spent (then, with ``wait``, until every trial has ended)."""
    import optuna
    from optuna.trial import TrialState

    from spectune.train.stages import TrainingDiverged

    assert cfg.search is not None
    study = open_study(cfg, task, method, store)
    space = resolve_space(cfg, task, method)
    metric = objective_metric(cfg, task)
    runner = TrialRunner(cfg, task, method, metric)
    say = on_line or (lambda _: None)
    while True:
        for n in fail_stale(study, cfg.search.stale_after_s):
            say(f"search {task} / {method}: trial {n} was left running by a stopped worker; its values are queued again")
        trial = _claim(study, cfg, space)
        if trial is None:
            break
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        try:
            beat = lambda: study._storage.set_trial_user_attr(trial._trial_id, "alive_at", time.time())  # noqa: E731
            with Heartbeat(beat, beat_every(cfg.search.stale_after_s)):
                value = runner(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            say(f"search {task} / {method} trial {trial.number}: {values} -> pruned")
            continue
        except TrainingDiverged as err:
            trial.set_user_attr("reason", f"diverged: {err}")
            study.tell(trial, state=TrialState.PRUNED)
            say(f"search {task} / {method} trial {trial.number}: {values} -> diverged")
            continue
        except BaseException as err:
            trial.set_user_attr("reason", f"{type(err).__name__}: {err}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(err, Exception):
                raise SearchError(f"search {task} / {method} trial {trial.number} ({values}) failed: {err}") from err
            raise
        study.tell(trial, value)
        say(f"search {task} / {method} trial {trial.number}: {values} -> validation_{metric} {value:.4f}")
    while wait:
        fail_stale(study, cfg.search.stale_after_s)
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))]
        if not running:
            break
        if _waiting(study):  # a queued retry nobody has picked up: this worker takes it
            return run_study(cfg, task, method, on_line, wait, store)
        time.sleep(5)
    return study


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --- choosing and recording ------------------------------------------------------------------------


def choose(trials: pd.DataFrame, maximize: bool) -> pd.Series | None:
    """The best complete trial (ties: the lowest number, so every worker and re-run picks the same one)."""
    done = trials[trials["state"] == "COMPLETE"]
    if done.empty:
        return None
    order = done.sort_values(["value", "number"], ascending=[not maximize, True])
    return order.iloc[0]


def trial_table(study: Any, task: str, method: str) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        reason = t.user_attrs.get("reason", "")
        if t.state.name == "FAIL" and reason in SKIPPED:
            continue
        seeds = t.user_attrs.get("seed_values", {})
        rows.append({"task": task, "method": method, "number": t.number, "state": t.state.name,
                     "value": t.value if t.value is not None else (float(np.mean(list(seeds.values()))) if seeds else math.nan),
                     **{f"param:{k}": v for k, v in t.params.items()},
                     **{f"seed:{k}": v for k, v in seeds.items()},
                     "reason": reason, "worker": t.user_attrs.get("worker", ""),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else math.nan,
                     **{k: t.user_attrs.get("cost", {}).get(k, math.nan) for k in TRIAL_COSTS}})
    return pd.DataFrame(rows)


@dataclass
class SearchResult:
    trials: pd.DataFrame
    chosen: dict[str, dict[str, dict[str, Any]]]  # task -> method -> {"values", "value", "trial", "metric"}
    unfinished: list[tuple[str, str]] = field(default_factory=list)  # (task, method) studies with budget left

    def values(self, task: str, method: str) -> dict[str, Any] | None:
        entry = self.chosen.get(task, {}).get(method)
        return entry["values"] if entry else None


def run_search(cfg: CompareConfig, on_line: Callable[[str], None] | None = None, wait: bool = True,
               tasks: list[str] | None = None, read_only: bool = False) -> SearchResult:
    """Every searched task x method (of ``tasks``, default all), study after study.

    With ``wait`` (and all tasks) it writes trials.csv and chosen.json to ``search/``;
    ``read_only`` trains nothing and records what the studies hold now.
    """
    assert cfg.search is not None
    store = storage(cfg)
    tables = []
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    unfinished: list[tuple[str, str]] = []
    studies = [(task, method) for task in (tasks or list(cfg.tasks)) for method in searched_methods(cfg)]
    if not read_only:
        for task, method in studies:  # first pass: claim trials, never wait (other workers may hold the last ones)
            run_study(cfg, task, method, on_line, wait=False, store=store)
    for task, method in studies:
        study = open_study(cfg, task, method, store) if read_only else run_study(cfg, task, method, on_line, wait=wait, store=store)
        table = trial_table(study, task, method)
        tables.append(table)
        metric = objective_metric(cfg, task)
        best = choose(table, METRIC_DIRECTION[metric]) if not table.empty else None
        if read_only and not spent(table, cfg.search.trials):
            unfinished.append((task, method))  # its best so far is not a choice: a later trial may beat it
            best = None
        if best is not None:
            values = {c.removeprefix("param:"): _plain(best[c]) for c in table if c.startswith("param:") and pd.notna(best[c])}
            chosen.setdefault(task, {})[method] = {"values": values, "value": float(best["value"]),
                                                   "trial": int(best["number"]), "metric": f"validation_{metric}"}
    trials = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if wait and tasks is None:  # only a worker that saw every trial end writes the record (--search-only may leave early)
        out = search_dir(cfg)
        _io.write_text(out / TRIALS_FILE, trials.to_csv(index=False))
        _io.write_json(out / CHOSEN_FILE, chosen)
    return SearchResult(trials, chosen, unfinished)


def spent(trials: pd.DataFrame, budget: int) -> bool:
    """Whether a study's budget is spent: ``budget`` trials completed or pruned, none still running."""
    if trials.empty:
        return False
    return bool((trials["state"].isin(["COMPLETE", "PRUNED"])).sum() >= budget and not (trials["state"] == "RUNNING").any())


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


class SearchPerTask:
    """The chosen values of a task, its search run on first request (a grid in task order gets results early)."""

    def __init__(self, cfg: CompareConfig, on_line: Callable[[str], None] | None = None) -> None:
        self.cfg, self.on_line = cfg, on_line
        self.done: dict[str, SearchResult] = {}

    def values(self, task: str, method: str) -> dict[str, Any] | None:
        if task not in self.done:
            self.done[task] = run_search(self.cfg, self.on_line, tasks=[task])
        return self.done[task].values(task, method)
