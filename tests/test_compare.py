"""spectune compare: statistics against independent computations, and a resumable grid on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spectune.compare import cell_config, load_compare_config, run_grid
from spectune.compare.config import cell_dir
from spectune.compare.grid import StaleCell
from spectune.compare.report import write_report
from spectune.compare.stats import paired, summarize, t_interval, verdict, win_tie_loss
from spectune.train import TrainConfigError


def test_t_interval_matches_the_textbook_formula():
    mean, lo, hi = t_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t_{0.975,3} * sd / sqrt(n)
    assert mean == 2.5 and lo == pytest.approx(2.5 - half, abs=1e-12) and hi == pytest.approx(2.5 + half, abs=1e-12)
    m1, lo1, hi1 = t_interval(np.array([0.7]))
    assert m1 == 0.7 and math.isnan(lo1) and math.isnan(hi1)


def _table(values: dict[str, list[float]], metric: str = "test_accuracy", task_type: str = "classification") -> pd.DataFrame:
    rows = []
    for method, vals in values.items():
        for seed, v in enumerate(vals):
            rows.append({"task": "t", "method": method, "seed": seed, "status": "ok", "task_type": task_type, metric: v,
                         "trainable_parameters": 10.0})
    return pd.DataFrame(rows)


def test_paired_differences_tests_and_counts():
    base = [0.80, 0.82, 0.78, 0.81, 0.79, 0.80]
    better = [b + d for b, d in zip(base, [0.02, 0.03, 0.01, 0.02, 0.04, 0.0])]
    noisy = [b + d for b, d in zip(base, [0.05, -0.04, 0.02, -0.03, 0.01, 0.0])]
    df = _table({"base": base, "better": better, "noisy": noisy})
    p = paired(df, "base", tie_tolerance=0.005).set_index("method")
    d = np.array(better) - np.array(base)
    assert p.loc["better", "diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert (p.loc["better", "ci_low"], p.loc["better", "ci_high"]) == pytest.approx(t_interval(d)[1:], abs=1e-12)
    assert p.loc["better", "p_ttest"] == pytest.approx(stats.ttest_rel(better, base).pvalue, rel=1e-12)
    assert p.loc["better", "p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
    assert (p.loc["better", "wins"], p.loc["better", "ties"], p.loc["better", "losses"]) == (5, 1, 0)
    assert p.loc["better", "verdict"] == "better" and p.loc["noisy", "verdict"] == "no clear difference"
    assert (p.loc["noisy", "wins"], p.loc["noisy", "ties"], p.loc["noisy", "losses"]) == (3, 1, 2)
    raw = p[["p_ttest"]].to_numpy().ravel()
    assert p["p_adjusted"].to_numpy() == pytest.approx(stats.false_discovery_control(raw), rel=1e-12)
    wtl = win_tie_loss(p.reset_index()).set_index("method")
    assert wtl.loc["better", "tasks_better"] == 1 and wtl.loc["noisy", "tasks_better"] == 0


def test_paired_statistics_match_hand_computed_answers():
    """Pinned by hand, not by the scipy calls the code makes.

    d = [0.02, 0.03, 0.01, 0.02, 0.04, 0]: mean 0.02, sd = sqrt(0.001 / 5) = sqrt(2e-4), se = sd / sqrt(6), so
    t = 0.02 / se = 2 * sqrt(3) with 5 degrees of freedom: two-sided p = 0.017963, and the 95% interval is
    0.02 +/- t_{0.975,5} * se = 0.02 +/- 2.570582 * 0.0057735 = 0.02 +/- 0.014841. Wilcoxon drops the zero and
    ranks 5 positive differences: the exact two-sided p is 2 / 2^5 = 0.0625.
    """
    base = [0.80, 0.82, 0.78, 0.81, 0.79, 0.80]
    better = [b + d for b, d in zip(base, [0.02, 0.03, 0.01, 0.02, 0.04, 0.0])]
    p = paired(_table({"base": base, "better": better}), "base").set_index("method").loc["better"]
    assert p["diff"] == pytest.approx(0.02, abs=1e-12)
    assert p["p_ttest"] == pytest.approx(0.017963, abs=5e-7)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((0.02 - 0.014841, 0.02 + 0.014841), abs=5e-7)
    assert p["p_wilcoxon"] == pytest.approx(0.0625, abs=1e-12)
    assert p["p_adjusted"] == p["p_ttest"]  # one comparison: nothing to adjust


def test_benjamini_hochberg_on_several_p_values_and_untestable_ones():
    from spectune.compare.stats import bh_adjusted

    # by hand: ranked 0.01, 0.012, 0.5 of m = 3 -> p * m / rank = 0.03, 0.018, 0.5; then the running minimum from
    # the top makes the first 0.018 (a smaller p never gets a larger adjusted value)
    assert bh_adjusted([0.01, 0.012, 0.5]) == pytest.approx([0.018, 0.018, 0.5], abs=1e-12)
    assert bh_adjusted([0.5, 0.01, 0.012]) == pytest.approx([0.5, 0.018, 0.018], abs=1e-12)  # order kept
    # a comparison with no test (one pair, or identical differences) stays NaN and is not counted in m
    out = bh_adjusted([0.01, math.nan, 0.012, 0.5])
    assert math.isnan(out[1]) and [out[0], out[2], out[3]] == pytest.approx([0.018, 0.018, 0.5], abs=1e-12)
    assert np.isnan(bh_adjusted([math.nan, math.nan])).all() and bh_adjusted([]).size == 0
    # m = 4, all small: 0.001 * 4 / 1, 0.002 * 4 / 2, 0.003 * 4 / 3, 0.004 * 4 / 4 = 0.004 each
    assert bh_adjusted([0.004, 0.003, 0.002, 0.001]) == pytest.approx([0.004] * 4, abs=1e-12)


def test_methods_can_have_their_own_baseline():
    df = _table({"full": [0.8, 0.8, 0.8], "lora": [0.6, 0.7, 0.65], "adaptive": [0.7, 0.75, 0.7]})
    p = paired(df, {"full": None, "lora": "full", "adaptive": "lora"}).set_index("method")
    assert p.loc["adaptive", "baseline"] == "lora" and p.loc["adaptive", "diff"] == pytest.approx(0.2 / 3)
    assert p.loc["lora", "baseline"] == "full" and "full" not in p.index
    with pytest.raises(TrainConfigError, match="pairs: 'nope'"):
        load_compare_config({"tasks": {"t": {"data": {"name": "trec"}}}, "methods": {"a": {}, "b": {}}, "pairs": {"b": "nope"}})


def test_lower_is_better_metrics_flip_the_verdict():
    df = _table({"base": [20.0, 21.0, 19.0], "lower": [18.0, 19.5, 17.0]}, metric="test_perplexity", task_type="causal_lm")
    p = paired(df, "base").set_index("method")
    assert p.loc["lower", "diff"] < 0 and p.loc["lower", "verdict"] == "better" and p.loc["lower", "wins"] == 3
    s = summarize(df).set_index("method")
    assert s.loc["lower", "metric"] == "test_perplexity" and s.loc["lower", "mean"] == pytest.approx(18.1666666, abs=1e-6)
    assert verdict(-2.0, -1.0, higher_better=True) == "worse" and verdict(math.nan, 1.0, True) == "too few pairs"


def test_pairs_use_only_seeds_both_methods_finished():
    df = _table({"base": [0.5, 0.6, 0.7], "m": [0.6, 0.7, 0.8]})
    df = df[~((df["method"] == "m") & (df["seed"] == 2))]
    p = paired(df, "base").set_index("method")
    assert p.loc["m", "pairs"] == 2 and p.loc["m", "diff"] == pytest.approx(0.1)


def test_bad_comparison_configs_name_the_problem(tmp_path):  # type: ignore[no-untyped-def]
    good = {"tasks": {"t": {"data": {"name": "trec"}}}, "methods": {"a": {}, "b": {"plan": {"policy": "phased"}}}}
    with pytest.raises(TrainConfigError, match="baseline 'zzz' is not one of the methods"):
        load_compare_config({**good, "baseline": "zzz"})
    with pytest.raises(TrainConfigError, match="(?s)cell task=t method=b: .*train.lr"):
        load_compare_config({**good, "methods": {"a": {}, "b": {"train": {"lr": -1}}}})
    with pytest.raises(TrainConfigError, match="seedz"):
        load_compare_config({**good, "seedz": [1]})
    with pytest.raises(TrainConfigError, match="names a folder"):
        load_compare_config({**good, "methods": {"a/../b": {}}})
    cfg = load_compare_config({**good, "methods": {"r": {"plan": {"policy": "random-select", "params": {"seed": "${seed}"}}}},
                               "seeds": [7]})
    assert cell_config(cfg, "t", "r", 7).plan.params == {"seed": 7}
    assert cell_config(cfg, "t", "r", 7).train.seed == 7 and cell_config(cfg, "t", "r", 7).data.seed == 7


def _grid(assets, out, **extra):  # type: ignore[no-untyped-def]
    return load_compare_config({
        "name": "tiny",
        "base": {"model": {"name": str(assets / "bert"), "max_length": 16}, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
                 "eval": {"batch_size": 64}},
        **({"base": extra.pop("base")} if "base" in extra else {}),
        "tasks": {"toy": {"data": {"path": str(assets / "cls.csv")}}},
        "methods": {"full": {}, "phased": {"plan": {"policy": "phased"}},
                    "broken": {"plan": {"file": str(out / "no-such-plan.yaml")}}},
        "seeds": [0, 1],
        "output_dir": str(out),
        **extra,
    })


def test_grid_runs_keeps_failures_and_resumes_only_missing_cells(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _grid(assets, tmp_path / "cmp")
    df = run_grid(cfg, progress=False)
    assert len(df) == 6 and set(df["status"]) == {"ok", "failed"}
    failed = df[df["status"] == "failed"]
    assert set(failed["method"]) == {"broken"} and failed["error"].str.contains("no-such-plan").all()
    assert (cell_dir(cfg, "toy", "broken", 0) / "failed.json").exists()
    ok = df[df["status"] == "ok"]
    assert ok["test_accuracy"].between(0, 1).all() and (ok["trainable_parameters"] > 0).all()
    assert ok["peak_memory_mb"].gt(0).all() and "gap_accuracy" in ok
    # cost per cell: step time after the warm-up step, AdamW's state (two moments per trained element, a step
    # counter per trained tensor), no CUDA peak on a CPU
    assert ok["seconds_per_step"].between(0, 10).all() and ok["seconds_per_step"].gt(0).all()
    assert (ok["optimizer_state_parameters"] > 2 * ok["trainable_parameters"]).all()
    assert (ok["optimizer_state_parameters"] < 2 * ok["trainable_parameters"] + 1000).all()
    assert ok["peak_gpu_memory_mb"].isna().all() or ok["peak_gpu_memory_mb"].gt(0).all()
    assert (ok.loc[ok["method"] == "full", "mean_lr_scale"] == 1.0).all()
    assert ok.loc[ok["method"] == "phased", "mean_lr_scale"].between(0.1, 1.0).all()
    on_disk = pd.read_parquet(tmp_path / "cmp" / "results.parquet")
    assert len(on_disk) == 6

    # a finished cell is read back, not retrained; a removed one is trained again
    from spectune.compare import cells

    summaries = {c: cell_dir(cfg, c.task, c.method, c.seed) / "summary.json" for c in cells(cfg) if c.method != "broken"}
    before = {c: p.stat().st_mtime_ns for c, p in summaries.items()}
    redo = next(c for c in summaries if c.method == "phased" and c.seed == 1)
    summaries[redo].unlink()
    again = run_grid(cfg, progress=False)
    changed = {c for c, p in summaries.items() if p.stat().st_mtime_ns != before[c]}
    assert changed == {redo}
    timings = ["wall_time_s", "train_runtime_s", "seconds_per_step", "peak_memory_mb", "peak_gpu_memory_mb", "analysis_time_s"]
    pd.testing.assert_frame_equal(
        again[again["status"] == "ok"].drop(columns=timings).reset_index(drop=True),
        df[df["status"] == "ok"].drop(columns=timings).reset_index(drop=True),
        check_exact=False, atol=1e-6,
    )  # the retrained cell reproduces its first result: same seed, same rows

    # a cell written before a config key existed (or with a retired one) is read back as it is
    import yaml

    stored = cell_dir(cfg, "toy", "full", 0) / "config.yaml"
    older = yaml.safe_load(stored.read_text())
    del older["eval"]["chunk_mb"]
    older["data"]["block_size"] = 128  # and a key older versions wrote that nothing read (retired)
    stored.write_text(yaml.safe_dump(older, sort_keys=False))
    before = summaries[next(c for c in summaries if c.method == "full" and c.seed == 0)].stat().st_mtime_ns
    run_grid(cfg, progress=False)
    assert summaries[next(c for c in summaries if c.method == "full" and c.seed == 0)].stat().st_mtime_ns == before

    # an edited comparison refuses to reuse cells trained under the old config, naming the key
    edited = _grid(assets, tmp_path / "cmp", base={**cfg.base, "train": {**cfg.base["train"], "lr": 5e-4}})
    with pytest.raises(StaleCell, match="train.lr: was 0.001, now 0.0005"):
        run_grid(edited, progress=False)

    report = write_report(again, cfg, cfg.output_dir, command="spectune compare tiny.yaml")
    text = report.read_text()
    assert "<img" in text and "data:image/png;base64," in text and "Failed cells" in text
    assert "phased" in text and "full" in text and "spectune compare tiny.yaml" in text
    from spectune.compare.markdown import write_markdown

    md = write_markdown(again, cfg, cfg.output_dir, command="spectune compare tiny.yaml").read_text()
    assert "## toy" in md and "| phased" in md and "](plots/toy_scores.png)" in md
    summary = pd.read_csv(tmp_path / "cmp" / "summary.csv")
    assert set(summary["method"]) == {"full", "phased"}
    assert json.loads((cell_dir(cfg, "toy", "full", 0) / "summary.json").read_text())["metrics"]["test_accuracy"] >= 0


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples" / "compare").glob("*.yaml"))
                         + sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml")))
def test_example_comparisons_are_valid(path):  # type: ignore[no-untyped-def]
    cfg = load_compare_config(path)
    assert cfg.baseline in cfg.methods and len(cfg.seeds) >= 3


def test_demo_config_is_the_promised_grid():
    from spectune.compare.demo import demo_config

    cfg = demo_config("out/x")
    policies = {cell_config(cfg, "trec", m, 0).plan.policy for m in cfg.methods}
    assert {"phased", "alpha-balance", None} <= policies and len(cfg.seeds) == 3
    assert cell_config(cfg, "trec", "full-uniform", 0).model.name == "minilm"
    # the rates are the recorded search's choices, one per method, not a shared guess
    from spectune.compare.demo import TUNED_LR

    assert {m: cell_config(cfg, "trec", m, 0).train.lr for m in cfg.methods} == TUNED_LR


def test_findings_name_the_direction_and_a_smaller_mean_rate():
    from spectune.compare.report import findings

    df = _table({"base": [0.8, 0.82, 0.81], "slow": [0.5, 0.55, 0.52], "same": [0.8, 0.83, 0.80]})
    df["mean_lr_scale"] = df["method"].map({"base": 1.0, "slow": 0.4, "same": 1.0})
    text = findings(paired(df, "base"), summarize(df))
    slow = next(s for s in text if s.startswith("t: slow"))
    same = next(s for s in text if s.startswith("t: same"))
    assert "worse than base" in slow and "mean rate scale was 0.40" in slow
    assert "not distinguishable from base" in same and "rate scale" not in same


def test_curve_puts_each_tasks_setting_beside_its_paired_difference(assets, tmp_path):  # type: ignore[no-untyped-def]
    from spectune.compare.plots import plot_curve
    from spectune.compare.report import curve_table

    cfg = load_compare_config({
        "name": "curve", "base": {"model": {"name": str(assets / "bert")}},
        "tasks": {f"toy-{n}": {"data": {"path": str(assets / "cls.csv"), "max_examples": n}} for n in (64, 32)},
        "methods": {"a": {}, "b": {}}, "seeds": [0, 1], "curve": "data.max_examples", "output_dir": str(tmp_path)})
    df = _table({"a": [0.5, 0.6, 0.55], "b": [0.6, 0.62, 0.6]}).assign(task="toy-32")
    df = pd.concat([df, _table({"a": [0.7, 0.72, 0.71], "b": [0.7, 0.73, 0.70]}).assign(task="toy-64")])
    curve = curve_table(paired(df, "a"), cfg)
    assert list(curve["x"]) == [32, 64] and set(curve["family"]) == {"cls"}
    assert curve.loc[curve["x"] == 32, "diff"].iloc[0] == pytest.approx(np.mean([0.1, 0.02, 0.05]))
    # one Benjamini-Hochberg over the whole curve, not one per task
    from scipy import stats as sps
    assert curve["p_adjusted_curve"].to_numpy() == pytest.approx(sps.false_discovery_control(curve["p_ttest"].to_numpy()))
    assert (curve["p_adjusted_curve"] >= curve["p_adjusted"] - 1e-12).all()
    assert plot_curve(curve, "data.max_examples", tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")


def test_a_narrow_terminal_drops_columns_but_never_cuts_the_task_or_the_mean():
    """In a 160-column log the printed table once cut the mean to `0.6…` and the task name to `for…`."""
    import io

    from rich.console import Console

    from spectune.cli import _comparison_table
    from spectune.compare.pareto import front_table
    from spectune.compare.console import console_rows

    task = "movie-sentiment-64-examples-long-task-name"
    long = {f"full-alpha-balance-sqrt-{i}": [0.61234 + 0.01 * i + d for d in (0.0, 0.01, -0.01)] for i in range(3)}
    df = _table(long).assign(task=task, peak_memory_mb=900.0, wall_time_s=30.0, seconds_per_step=0.25,
                             optimizer_state_parameters=4.4e7, mean_lr_scale=1.0)
    rows = pd.DataFrame(console_rows(summarize(df), paired(df, next(iter(long))), front_table(df)))
    for width in (160, 100, 60):
        table, left_out = _comparison_table("results", rows, width)
        out = io.StringIO()
        Console(file=out, width=width, color_system=None).print(table)
        text = out.getvalue()
        assert task in text and "…" not in text, text
        for mean in rows["mean"]:
            assert mean in text
        assert "lr scale" in left_out and set(left_out).isdisjoint({"task", "mean", "method"})
        assert ("peak mem" in left_out) == (width < 160)  # cost goes before the lower-value columns do
    table, left_out = _comparison_table("results", rows, 400)
    assert left_out == []  # a wide terminal shows every column


def test_the_table_shows_what_a_subset_method_trains_at_once():
    """LISA may train every block but steps two at a time: its row says both, a method training all it may says one."""
    from spectune.compare.console import console_rows

    df = _table({"full": [0.8, 0.81, 0.79], "lisa": [0.78, 0.8, 0.79]}).assign(trainable_parameters=134.5e6)
    df["trainable_parameters_active"] = np.where(df["method"] == "lisa", 35.4e6, 134.5e6)
    rows = {r["method"]: r["trainable"] for r in console_rows(summarize(df), paired(df, "full"))}
    assert rows == {"full": "134.5M", "lisa": "35.4M of 134.5M"}
    older = {r["method"]: r["trainable"] for r in console_rows(summarize(df.drop(columns="trainable_parameters_active")),
                                                                 paired(df, "full"))}
    assert older == {"full": "134.5M", "lisa": "134.5M"}  # runs from before the count keep the plain figure
