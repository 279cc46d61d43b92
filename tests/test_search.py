"""The equal-budget search inside ``spectune compare``: validation only, resumable, shared by workers (tiny BERT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from spectune._config import ConfigError
from spectune.compare import load_compare_config
from spectune.compare.config import cell_dir
from spectune.compare.run import compare
from spectune.compare.search import choose, run_search, search_dir

pytestmark = pytest.mark.slow


def _cfg(assets: Path, out: Path, **search) -> dict:  # type: ignore[type-arg]
    return {
        "name": "tiny-search",
        "base": {"model": {"name": str(assets / "bert"), "max_length": 16},
                 "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3}, "eval": {"batch_size": 64}},
        "tasks": {"toy": {"data": {"path": str(assets / "cls.csv")}}},
        "methods": {"full": {}, "ab": {"plan": {"policy": "alpha-balance", "params": {"normalize": "mean"}}}},
        "seeds": [0, 1],
        "search": {"trials": 3, "seeds": [10], "sampler": "grid", "pruner": "none",
                   "space": {"train.lr": {"ratio": [0.1, 1.0], "log": True, "points": 3}}, **search},
        "output_dir": str(out),
    }


def _trials(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "search" / "trials.csv")


def test_search_picks_on_validation_and_only_final_cells_read_test(assets, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "cmp"
    cfg = load_compare_config(_cfg(assets, out))
    lines: list[str] = []
    result = compare(cfg, progress=False, on_line=lines.append)
    trials = _trials(out)
    for method in ("full", "ab"):
        t = trials[trials["method"] == method]
        assert len(t) == 3 and set(t["state"]) == {"COMPLETE"}  # the same budget for both methods
        assert sorted(t["param:train.lr"]) == pytest.approx([3e-4, 9.48683e-4, 3e-3], rel=1e-5)
        best = choose(t, maximize=True)
        chosen = result.search.chosen["toy"][method]
        assert chosen["values"]["train.lr"] == pytest.approx(best["param:train.lr"]) and chosen["trial"] == best["number"]
        # the search's cells never evaluated the test split; the final cells trained at the chosen rate and did
        for folder in (search_dir(cfg) / "toy" / method).glob("trial-*/seed-*"):
            assert not any(k.startswith("test_") for k in json.loads((folder / "summary.json").read_text())["metrics"])
        for seed in cfg.seeds:
            final = cell_dir(cfg, "toy", method, seed)
            assert yaml.safe_load((final / "config.yaml").read_text())["train"]["lr"] == pytest.approx(best["param:train.lr"])
            assert "test_accuracy" in json.loads((final / "summary.json").read_text())["metrics"]
    assert sum("search toy /" in line for line in lines) == 6
    html = result.report.read_text()
    assert "Chosen values" in html and "Every trial" in html and "toy: search" in html
    assert "## Search" in (out / "results.md").read_text()

    # a re-run trains nothing: the studies are spent and every cell is finished
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    again = compare(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps
    assert again.search.chosen == result.search.chosen
    # a report of what has finished, with one more method that never ran: nothing is trained, nothing is lost
    grown = load_compare_config({**_cfg(assets, out), "methods": {**_cfg(assets, out)["methods"], "later": {"train": {"epochs": 1}}}})
    partial = compare(grown, progress=False, report_only=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps
    assert set(partial.results["method"]) == {"full", "ab"} and partial.search.chosen["toy"]["full"] == result.search.chosen["toy"]["full"]
    # a budget raised after the fact leaves the studies unfinished: their best so far is not reported as chosen
    raised = load_compare_config({**_cfg(assets, out), "search": {
        **_cfg(assets, out)["search"], "trials": 4, "sampler": "tpe", "space": {"train.lr": {"ratio": [0.1, 1.0], "log": True}}}})
    unfinished = compare(raised, progress=False, report_only=True)
    assert unfinished.search.chosen == {} and set(unfinished.search.unfinished) == {("toy", "full"), ("toy", "ab")}
    assert "Still searching" in (out / "results.md").read_text()
    # only cells trained as this config now asks (the base rate, no chosen value) are read; none is retrained
    at_base = {m for m, c in result.search.chosen["toy"].items() if c["values"]["train.lr"] == pytest.approx(3e-3)}
    assert set(unfinished.results["method"]) == at_base
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps


def _worker(cfg_path: Path, *extra: str) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "spectune.cli", "compare", str(cfg_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_two_workers_share_one_search_without_running_a_trial_twice(assets, tmp_path):  # type: ignore[no-untyped-def]
    shared = tmp_path / "shared"
    data = _cfg(assets, shared, trials=4, space={"train.lr": {"ratio": [0.1, 1.0], "log": True, "points": 4}})
    data["methods"] = {"full": {}}
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(data))
    workers = [_worker(path, "--search-only"), _worker(path, "--search-only")]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    cfg = load_compare_config(data)
    found = run_search(cfg)  # the record, written by a worker that sees every trial ended; trains nothing more
    t = found.trials
    assert len(t) == 4 and set(t["state"]) == {"COMPLETE"} and t["param:train.lr"].nunique() == 4
    assert t["worker"].nunique() == 2  # both workers trained trials
    trained = list((search_dir(cfg) / "toy" / "full").glob("trial-*/seed-*/summary.json"))
    assert len(trained) == 4  # one run per trial: none trained twice

    # one worker, from scratch, over the same grid: the same trials, scores and choice
    alone = load_compare_config({**data, "output_dir": str(tmp_path / "alone")})
    single = run_search(alone).trials
    key = lambda df: df.sort_values("param:train.lr")[["param:train.lr", "value"]].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(key(single), key(t), check_exact=False, atol=1e-9)
    assert found.chosen == run_search(alone).chosen


def test_a_killed_search_resumes_with_the_same_budget(assets, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "killed"
    data = _cfg(assets, out)
    data["methods"] = {"full": {}}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(data))
    worker = _worker(path, "--search-only")
    deadline = time.time() + 300
    trial_dirs = search_dir(load_compare_config(data)) / "toy" / "full"
    while not list(trial_dirs.glob("trial-1/seed-*")) and time.time() < deadline:  # trial 0 done, trial 1 started
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    found = run_search(load_compare_config(data))
    t = found.trials
    done = t[t["state"] == "COMPLETE"]
    assert len(done) == 3 and done["param:train.lr"].nunique() == 3
    stale = t[t["state"] == "FAIL"]
    assert len(stale) <= 1 and stale["reason"].fillna("").str.startswith("stale").all()
    if len(stale):  # killed mid-trial: its values were queued again and trained by the resumed search
        assert stale["param:train.lr"].iloc[0] in set(done["param:train.lr"])


def test_search_config_errors_name_the_problem(assets, tmp_path):  # type: ignore[no-untyped-def]
    base = _cfg(assets, tmp_path / "x")
    with pytest.raises(ConfigError, match="share \\[0\\]"):
        load_compare_config({**base, "search": {**base["search"], "seeds": [0, 9]}})
    with pytest.raises(ConfigError, match="grid has 3 points but search.trials is 4"):
        load_compare_config({**base, "search": {**base["search"], "trials": 4}})
    with pytest.raises(ConfigError, match="baseline 'full' is not"):
        load_compare_config({**base, "search": {**base["search"], "methods": ["ab"]}})
    with pytest.raises(ConfigError, match="exactly one of low/high, ratio or choices"):
        load_compare_config({**base, "search": {**base["search"], "space": {"train.lr": {"low": 1e-4, "high": 1e-3, "ratio": [1, 2]}}}})
    with pytest.raises(ConfigError, match="nope"):
        load_compare_config({**base, "search": {**base["search"], "space": {"train.nope": {"choices": [1, 2, 3]}}}})


def test_choose_follows_the_metric_direction_and_breaks_ties_by_trial_number():
    trials = pd.DataFrame({"number": [0, 1, 2, 3, 4], "state": ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL"],
                           "value": [0.8, 0.9, 0.95, 0.9, 0.99]})
    assert choose(trials, maximize=True)["number"] == 1  # 0.9 twice: the earlier trial; pruned and failed never chosen
    ppl = trials.assign(value=[12.0, 10.5, 9.0, 11.0, 1.0])
    assert choose(ppl, maximize=False)["number"] == 1  # perplexity: lower is better
    assert choose(trials[trials["state"] != "COMPLETE"], maximize=True) is None


def test_epoch_pruning_reports_each_epochs_validation(assets, tmp_path):  # type: ignore[no-untyped-def]
    data = _cfg(assets, tmp_path / "ep", pruner="median", prune_on="epoch")
    data["methods"] = {"full": {}}
    cfg = load_compare_config(data)
    found = run_search(cfg)
    assert len(found.trials) == 3 and set(found.trials["state"]) <= {"COMPLETE", "PRUNED"}
    import optuna

    from spectune.compare.search import open_study

    study = open_study(cfg, "toy", "full")
    steps = [sorted(t.intermediate_values) for t in study.trials if t.state.name == "COMPLETE"]
    assert steps and all(s == [1, 2] for s in steps)  # one report per epoch of the (single) search seed
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
