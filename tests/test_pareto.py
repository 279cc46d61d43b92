"""The quality-cost front and the budget recommendation, on constructed results with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spectune.compare.pareto import COST_TOLERANCE, choose, front_table, memory_column, parse_budget, recommendations

BASE = [0.80, 0.82, 0.78, 0.81, 0.79]


def _results(methods: dict[str, tuple[float, list[float]]], task: str = "t") -> pd.DataFrame:
    """method -> (peak memory MB, per-seed accuracy)."""
    rows = []
    for method, (mem, accs) in methods.items():
        for seed, acc in enumerate(accs):
            rows.append({"task": task, "method": method, "seed": seed, "status": "ok", "task_type": "classification",
                         "test_accuracy": acc, "peak_memory_mb": mem + 0.5 * seed, "wall_time_s": mem / 10})
    return pd.DataFrame(rows)


def _shift(deltas: list[float]) -> list[float]:
    return [b + d for b, d in zip(BASE, deltas)]


GRID = {
    "cheap": (100.0, BASE),
    "noisy": (500.0, _shift([0.04, -0.03, 0.05, -0.02, 0.01])),  # +0.01 on average, interval across 0
    "dominated": (800.0, _shift([-0.05, -0.04, -0.06, -0.05, -0.05])),  # worse than cheap on every seed
    "strong": (1000.0, _shift([0.06, 0.05, 0.07, 0.06, 0.06])),  # better than everything, and dearer
}


def test_a_dominated_method_is_never_on_the_front_and_noise_does_not_dominate():
    t = front_table(_results(GRID)).set_index("method")
    assert t.loc["dominated", "memory_dominated_by"] == "cheap, noisy" and not t.loc["dominated", "on_memory_front"]
    # noisy's mean is higher than cheap's, but only within noise: cheap stays on the front
    assert t.loc["noisy", "mean"] > t.loc["cheap", "mean"] and "noisy" not in t.loc["cheap", "beaten_by"]
    assert t.loc["cheap", "on_memory_front"] and t.loc["noisy", "on_memory_front"] and t.loc["strong", "on_memory_front"]
    assert set(t.loc["cheap", "beaten_by"].split(", ")) == {"strong"}  # beaten, but only at a higher cost
    assert t.loc["cheap", "memory_mb"] == pytest.approx(101.0) and t.loc["cheap", "n"] == 5
    # the interval of the memory over seeds (mem + 0.5 * seed): t_{0.975,4} * sd / sqrt(5)
    half = stats.t.ppf(0.975, 4) * np.std([0, 0.5, 1, 1.5, 2], ddof=1) / math.sqrt(5)
    assert t.loc["cheap", "memory_ci_high"] - t.loc["cheap", "memory_mb"] == pytest.approx(half)
    assert list(t["on_time_front"]) == list(t["on_memory_front"])  # time follows memory here


def test_equal_memory_within_the_tolerance_lets_a_better_method_dominate():
    same = {"a": (1000.0, BASE), "b": (1000.0 * (1 + COST_TOLERANCE / 2), _shift([0.02, 0.03, 0.02, 0.04, 0.03]))}
    t = front_table(_results(same)).set_index("method")
    assert not t.loc["a", "on_memory_front"] and t.loc["a", "memory_dominated_by"] == "b"
    dearer = {**same, "b": (1000.0 * (1 + 3 * COST_TOLERANCE), same["b"][1])}
    assert front_table(_results(dearer)).set_index("method").loc["a", "on_memory_front"]


def test_lower_is_better_metrics_and_unrecorded_costs():
    df = _results({"a": (100.0, [20.0, 21.0, 19.0]), "b": (200.0, [22.0, 23.5, 21.0])})
    df = df.rename(columns={"test_accuracy": "test_perplexity"}).assign(task_type="causal_lm")
    t = front_table(df).set_index("method")
    assert t.loc["b", "memory_dominated_by"] == "a" and t.loc["a", "on_memory_front"]  # lower perplexity, less memory
    old = df.assign(peak_memory_mb=np.where(df["method"] == "b", np.nan, df["peak_memory_mb"]))
    t = front_table(old).set_index("method")
    assert t.loc["b", "memory_dominated_by"] == "(not recorded)" and not t.loc["b", "on_memory_front"]


@pytest.mark.parametrize("seed", range(8))
def test_the_front_matches_its_definition_on_random_results(seed):
    """Every method on the front has no significantly better method at lower or equal memory; every other has one.

    Checked against the textbook paired interval (mean +- t * sd / sqrt(n)) computed here, not the module's helper.
    """
    rng = np.random.default_rng(seed)
    methods = {f"m{i}": (float(rng.uniform(100, 2000)), list(0.7 + rng.normal(rng.uniform(-0.05, 0.05), 0.02, 5)))
               for i in range(6)}
    t = front_table(_results(methods)).set_index("method")
    for m, (mem, accs) in methods.items():
        dominators = []
        for o, (omem, oaccs) in methods.items():
            d = np.array(oaccs) - np.array(accs)
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            if o != m and d.mean() - half > 0 and (omem + 1.0) <= (mem + 1.0) * (1 + COST_TOLERANCE):
                dominators.append(o)
        assert t.loc[m, "on_memory_front"] == (not dominators), (m, dominators)
        assert set(filter(None, t.loc[m, "memory_dominated_by"].split(", "))) == set(dominators)


def test_the_recommendation_is_the_least_memory_method_nothing_within_the_budget_beats():
    t = front_table(_results(GRID))
    assert choose(t, "t", 600)["method"] == "cheap"  # noisy is dearer and only better within noise
    assert choose(t, "t", None)["method"] == "strong"  # strong beats every other significantly
    assert choose(t, "t", 50) is None
    lines = recommendations(t, [600.0, 50.0])
    assert lines[0].startswith("t, within 600 MB: cheap (test_accuracy 0.8 [")
    assert "noisy has the best mean (0.81) but is not significantly better and peaks at 501 MB" in lines[0]
    assert lines[1] == "t, within 50 MB: no method fits; the lightest, cheap, peaked at 101 MB."
    (front_line,) = recommendations(t)
    assert front_line.startswith("t, at any memory: strong (") and "front: cheap (101 MB) < noisy (501 MB) < strong (1001 MB)" in front_line
    assert "\n" not in front_line


def test_methods_of_the_same_memory_within_noise_are_named_together():
    noise = [0.01, -0.01, 0.02, -0.02, 0.005]
    same = {"uniform": (1000.0, BASE), "balance": (1010.0, _shift(noise)), "phased": (1005.0, _shift([-n for n in noise])),
            "lora": (300.0, _shift([-0.05, -0.06, -0.05, -0.04, -0.05]))}
    t = front_table(_results(same))
    pick = choose(t, "t", None)
    assert pick["method"] == "balance"  # the best mean of the three that cost the same and nothing beats
    (line,) = recommendations(t)
    assert "; uniform and phased are within noise of it at the same memory" in line
    assert line.endswith("; front: lora (301 MB) < uniform, phased, balance (1001 MB).")  # equal memory named together
    assert "has the best mean" not in line  # the best mean is the pick itself


def test_budgets_and_the_memory_column():
    assert parse_budget("4GB") == 4096 and parse_budget("4 GiB") == 4096 and parse_budget("512MB") == 512
    assert parse_budget("1.5g") == 1536 and parse_budget("2048") == 2048 and parse_budget("1tb") == 2**20
    for bad in ("4XB", "", "-1GB", "0", "GB"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)
    df = _results({"a": (100.0, BASE)})
    assert memory_column(df) == "peak_memory_mb"
    assert memory_column(df.assign(peak_gpu_memory_mb=300.0)) == "peak_gpu_memory_mb"
    assert memory_column(df.assign(peak_gpu_memory_mb=[300.0, None, 300.0, 300.0, 300.0])) == "peak_memory_mb"
