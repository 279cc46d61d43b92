"""The published spectral policies: Model Balancing's per-block rates and temperature map, AlphaDecay's
weight-decay plans, the by-type rate control, plan format version 2 and weight decay in optimizer groups.

Expected values are worked out by hand from the formulas in docs/policies.md, not read back from the code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from spectune.analyze.result import COLUMNS, AnalysisResult
from spectune.plan import Plan, PlanError, param_groups, plan


def table(rows: list[dict], estimator: str | None = "hill") -> AnalysisResult:
    full = []
    for r in rows:
        row = {c: math.nan for c in COLUMNS}
        row.update(status="ok", note="", tied_to="", dtype="F32", rows=8, cols=8, numel=64, n_evals=100,
                   layer_index=0, alpha_estimator=estimator)
        row.update(r)
        full.append(row)
    result = AnalysisResult.from_rows(full, source="hand-built")
    if estimator is None:
        result.metrics = result.metrics.drop(columns=["alpha_estimator"])  # a table saved before the column existed
    return result


# Two blocks of four matrices plus an embedding outside the blocks.
#   block 0: alphas 2, 3, 4, 5 -> mean 3.5      block 1: 5, 6, 7, 8 -> mean 6.5
BLOCKS = [
    {"name": f"l.{b}.{m}.weight", "module_type": t, "layer_index": b, "alpha_hill": a, "numel": n}
    for b, alphas in enumerate([(2.0, 3.0, 4.0, 5.0), (5.0, 6.0, 7.0, 8.0)])
    for (m, t, n), a in zip([("q", "attn_q", 64), ("k", "attn_k", 64), ("up", "ffn_up", 256), ("down", "ffn_down", 256)], alphas)
]
BLOCKS.append({"name": "emb.weight", "module_type": "embedding", "layer_index": None, "alpha_hill": 9.0, "numel": 512})
TB = table(BLOCKS)


def block_names(b: int) -> list[str]:
    return [f"l.{b}.{m}.weight" for m in ("q", "k", "up", "down")]


# --- Model Balancing: per-block alpha, linear and sigmoid maps ---------------------------------


def test_block_granularity_shares_one_rate_per_block_from_the_mean_alpha():
    p = plan(TB, "alpha-balance", {"granularity": "block"})
    # two block means (3.5, 6.5) -> min-max 0, 1 -> scales 0.5, 1.5
    assert {p.lr_scale[n] for n in block_names(0)} == {0.5}
    assert {p.lr_scale[n] for n in block_names(1)} == {1.5}
    assert p.lr_scale["emb.weight"] == 1.0  # outside the blocks: base rate, as the paper's code
    assert any("3.500" in n and "6.500" in n for n in p.notes)
    per_matrix = plan(TB, "alpha-balance")  # today's default is unchanged: alphas 2..9 over [0.5, 1.5]
    assert per_matrix.lr_scale["l.0.q.weight"] == pytest.approx(0.5) and per_matrix.lr_scale["emb.weight"] == pytest.approx(1.5)


def test_block_mean_uses_only_matrices_with_an_alpha_and_shares_the_rate_with_the_rest():
    rows = [dict(r) for r in BLOCKS]
    rows[0]["n_evals"] = 10  # too few eigenvalues: no alpha of its own (2.0 leaves block 0's mean)
    rows[1]["alpha_hill"] = math.nan
    rows.append({"name": "l.2.q.weight", "module_type": "attn_q", "layer_index": 2, "alpha_hill": 6.0})
    p = plan(table(rows), "alpha-balance", {"granularity": "block"})
    # block means: (4 + 5) / 2 = 4.5, 6.5, 6.0 -> min-max 0, 1, 0.75 -> 0.5, 1.5, 1.25
    assert {p.lr_scale[n] for n in block_names(0)} == {0.5}  # the alpha-less matrices share their block's rate
    assert p.lr_scale["l.2.q.weight"] == pytest.approx(1.25)
    assert p.excluded == []


def test_sigmoid_map_is_model_balancings_temperature_formula():
    t, smin, smax = 0.8, 2.0, 1.0
    p = plan(TB, "alpha-balance", {"granularity": "block", "map": "sigmoid", "temperature": t,
                                   "sigmoid_min": smin, "sigmoid_max": smax})
    # block alphas 3.5, 6.5, mean 5 -> d = -1.5, +1.5
    sig = 1 / (1 + math.exp(-t * 1.5))
    low = 10 ** (smin * ((1 - sig) - 0.5))  # below the mean: sigmoid_min
    high = 10 ** (smax * (sig - 0.5))  # above the mean: sigmoid_max
    assert p.lr_scale["l.0.q.weight"] == pytest.approx(low, rel=1e-5)
    assert p.lr_scale["l.1.up.weight"] == pytest.approx(high, rel=1e-5)
    assert (p.min_scale, p.max_scale) == pytest.approx((10 ** (-smin / 2), 10 ** (smax / 2)))
    # a unit exactly at the mean keeps the base rate; a huge temperature saturates at the bounds
    three = table([{"name": f"l.{i}.q.weight", "module_type": "attn_q", "layer_index": i, "alpha_hill": a}
                   for i, a in enumerate([2.0, 3.0, 4.0])])
    mid = plan(three, "alpha-balance", {"granularity": "block", "map": "sigmoid"})
    assert mid.lr_scale["l.1.q.weight"] == pytest.approx(1.0)
    sat = plan(three, "alpha-balance", {"granularity": "block", "map": "sigmoid", "temperature": 1e4})
    assert sat.lr_scale["l.0.q.weight"] == pytest.approx(10 ** -1.0, rel=1e-4)
    assert sat.lr_scale["l.2.q.weight"] == pytest.approx(10 ** 0.5, rel=1e-4)


def test_sigmoid_map_per_matrix_is_monotone_in_alpha():
    p = plan(TB, "alpha-balance", {"map": "sigmoid", "temperature": 1.0})
    order = sorted(BLOCKS, key=lambda r: r["alpha_hill"])
    scales = [p.lr_scale[r["name"]] for r in order]
    assert all(b >= a - 1e-12 for a, b in zip(scales, scales[1:])) and scales[0] < 1 < scales[-1]


# --- AlphaDecay -------------------------------------------------------------------------------


def test_alpha_decay_maps_alpha_linearly_onto_the_decay_range():
    p = plan(TB, "alpha-decay", {"wd_min_ratio": 0.5, "wd_max_ratio": 2.5})
    # block-type matrices: alphas 2..8 -> (alpha - 2) / 6 onto [0.5, 2.5]; heavier tail, weaker decay
    for r in BLOCKS[:-1]:
        assert p.wd_scale[r["name"]] == pytest.approx(0.5 + 2.0 * (r["alpha_hill"] - 2) / 6, rel=1e-6)
    assert p.wd_scale["emb.weight"] == 1.0  # embeddings are not among AlphaDecay's linear modules
    assert set(p.lr_scale.values()) == {1.0} and (p.wd_min_scale, p.wd_max_scale) == (0.5, 2.5)
    defaults = plan(TB, "alpha-decay")
    assert defaults.wd_scale["l.0.q.weight"] == pytest.approx(0.666) and defaults.wd_scale["l.1.down.weight"] == pytest.approx(3.0)


def test_rates_and_decay_compose_in_one_plan():
    params = {"granularity": "block", "map": "sigmoid", "normalize": "mean"}
    both = plan(TB, "alpha-decay", {"rates": "alpha-balance", "rates_params": params})
    rates = plan(TB, "alpha-balance", params)
    decay = plan(TB, "alpha-decay")
    assert both.lr_scale == rates.lr_scale and both.wd_scale == decay.wd_scale
    assert (both.min_scale, both.max_scale) == (rates.min_scale, rates.max_scale)
    with pytest.raises(PlanError, match="rates_params.*mapp|mapp"):
        plan(TB, "alpha-decay", {"rates": "alpha-balance", "rates_params": {"mapp": "sqrt"}})
    with pytest.raises(PlanError, match="rates_params given without rates"):
        plan(TB, "alpha-decay", {"rates_params": {"map": "sqrt"}})


# --- by-type ----------------------------------------------------------------------------------


def test_by_type_like_gives_each_type_the_weighted_mean_scale_of_the_spectral_plan():
    ab = plan(TB, "alpha-balance", {"map": "sqrt"})
    bt = plan(TB, "by-type", {"like": "alpha-balance", "map": "sqrt"})  # the like policy's keys inline
    assert bt == plan(TB, "by-type", {"like": "alpha-balance", "like_params": {"map": "sqrt"}})
    size = {r["name"]: r["numel"] for r in BLOCKS}
    for t in ("attn_q", "attn_k", "ffn_up", "ffn_down", "embedding"):
        names = [r["name"] for r in BLOCKS if r["module_type"] == t]
        mean = sum(size[n] * ab.lr_scale[n] for n in names) / sum(size[n] for n in names)
        assert len({bt.lr_scale[n] for n in names}) == 1
        assert bt.lr_scale[names[0]] == pytest.approx(mean, abs=2e-6)  # both plans store 6 decimals
    overall = lambda p: sum(size[n] * p.lr_scale[n] for n in size) / sum(size.values())  # noqa: E731
    assert overall(bt) == pytest.approx(overall(ab), abs=1e-5)  # same overall step size as the plan it imitates
    assert bt.params["like_params"]["map"] == "sqrt"  # the like policy's full parameters are recorded


def test_by_type_explicit_scales_and_errors_name_the_field():
    p = plan(TB, "by-type", {"scales": {"ffn_up": 1.4, "ffn_down": 1.4}, "default": 0.8})
    assert {p.lr_scale[n] for n in ("l.0.up.weight", "l.1.down.weight")} == {1.4}
    assert {p.lr_scale[n] for n in ("l.0.q.weight", "emb.weight")} == {0.8}
    assert (p.min_scale, p.max_scale) == (0.8, 1.4)
    with pytest.raises(PlanError, match="scales: unknown module type.*ffn_upp"):
        plan(TB, "by-type", {"scales": {"ffn_upp": 1.2}})
    with pytest.raises(PlanError, match="mapp"):
        plan(TB, "by-type", {"like": "alpha-balance", "mapp": "sqrt"})
    with pytest.raises(PlanError, match="needs scales .* or like"):
        plan(TB, "by-type")
    with pytest.raises(PlanError, match="unknown policy 'alpha-balanse'"):
        plan(TB, "by-type", {"like": "alpha-balanse"})


# --- estimator and plan format version 2 ----------------------------------------------------------


def test_plan_records_the_analysis_alpha_estimator():
    assert plan(table(BLOCKS, "farms"), "alpha-balance").alpha_estimator == "farms"
    assert plan(table(BLOCKS, None), "alpha-balance").alpha_estimator == "hill"  # saved before it was recorded


def test_version_1_plans_load_and_newer_versions_are_refused(tmp_path: Path):
    v1 = {  # a plan file as spectune wrote it before format version 2
        "format_version": 1, "spectune_version": "0.1.0", "model": "m", "analysis_digest": "abc", "policy": "phased",
        "params": {"phase": "svd"}, "min_scale": 0.1, "max_scale": 1.0, "lr_scale": {"a.weight": 0.5},
        "one_d_rule": "owner", "trainable": None, "lora": None, "notes": [], "excluded": [],
    }
    path = tmp_path / "v1.yaml"
    path.write_text(yaml.safe_dump(v1, sort_keys=False))
    old = Plan.load(path)
    assert old.lr_scale == {"a.weight": 0.5} and old.wd_scale == {} and old.decay_scale("a.weight") == 1.0
    assert old.alpha_estimator == "hill" and old.format_version == 2
    newer = dict(v1, format_version=3)
    with pytest.raises(PlanError, match=r"format_version: .*version 3 is newer than this spectune"):
        Plan.from_dict(newer)
    p = plan(TB, "alpha-decay")
    p.save(tmp_path / "v2.yaml")
    assert Plan.load(tmp_path / "v2.yaml") == p
    data = p.model_dump(mode="json")
    data["wd_scale"]["l.0.q.weight"] = 7.0
    with pytest.raises(PlanError, match=r"wd_scale\['l\.0\.q\.weight'\] = 7\.0 is outside"):
        Plan.from_dict(data)
    data = p.model_dump(mode="json")
    data["alpha_estimator"] = "pareto"
    with pytest.raises(PlanError, match="alpha_estimator"):
        Plan.from_dict(data)


# --- weight decay in optimizer groups, at the start and after a re-plan --------------------------------


def _bert():  # type: ignore[no-untyped-def]
    from tests.conftest import tiny_model

    return tiny_model("bert")


def test_param_groups_apply_wd_scale_to_matrices_and_none_to_1d():
    model = _bert()
    names = [n for n, p in model.named_parameters() if p.ndim == 2]
    target = "encoder.layer.0.attention.self.query.weight"
    p = Plan(spectune_version="0", model="m", analysis_digest="d", policy="alpha-decay", wd_min_scale=0.5,
             wd_max_scale=2.0, lr_scale={n: 1.0 for n in names}, wd_scale={target: 2.0, names[0]: 0.5})
    groups = {g["name"]: g for g in param_groups(model, p, base_lr=1e-3, weight_decay=0.01)}
    assert groups[target]["weight_decay"] == pytest.approx(0.02)
    assert groups[names[0]]["weight_decay"] == pytest.approx(0.005)
    assert groups["encoder.layer.0.attention.self.key.weight"]["weight_decay"] == pytest.approx(0.01)
    assert groups["encoder.layer.0.attention.self.query.bias"]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(list(groups.values()), lr=1e-3)
    assert opt.param_groups[list(groups).index(target)]["weight_decay"] == pytest.approx(0.02)


def test_param_groups_give_lora_adapters_their_layers_decay():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_bert(), LoraConfig(r=2, target_modules=["query"]))
    target = "encoder.layer.0.attention.self.query.weight"
    p = Plan(spectune_version="0", model="m", analysis_digest="d", policy="alpha-decay", wd_min_scale=0.5,
             wd_max_scale=3.0, lr_scale={target: 1.0}, wd_scale={target: 3.0})
    groups = {g["name"]: g for g in param_groups(model, p, base_lr=1e-3, weight_decay=0.1)}
    lora = [n for n in groups if "layer.0.attention.self.query.lora_" in n]
    assert lora and all(groups[n]["weight_decay"] == pytest.approx(0.3) for n in lora)
    assert all(groups[n]["weight_decay"] == pytest.approx(0.1) for n in groups if "layer.1.attention.self.query.lora_" in n)


def test_replan_moves_each_groups_weight_decay_to_the_new_plan(tmp_path: Path):
    from spectune.analyze import analyze
    from spectune.train.callbacks import ReplanCallback
    from spectune.train.config import PlanSection

    model = _bert()
    params = {"min_evals": 10}
    section = PlanSection(policy="alpha-decay", params=params)
    uniform = plan(analyze(model, progress=False), "uniform")
    groups = param_groups(model, uniform, base_lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert {g["weight_decay"] for g in opt.param_groups if g["params"][0].ndim == 2} == {0.01}
    cb = ReplanCallback(section, uniform, 1e-3, 0.01, tmp_path, cache={})
    new = cb.replan(model, opt, None, epoch=1, step=0, save=False)
    expected = plan(analyze(model, progress=False), "alpha-decay", params)
    assert new.wd_scale == expected.wd_scale and len(set(new.wd_scale.values())) > 2
    by_name = {g["name"]: g for g in opt.param_groups}
    for name, s in expected.wd_scale.items():
        assert by_name[name]["weight_decay"] == pytest.approx(0.01 * s)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if g["params"][0].ndim < 2)


# --- command line ----------------------------------------------------------------------------------


def flat(text: str) -> str:
    """CLI output with the console's line wrapping undone."""
    return " ".join(text.split())


def test_cli_estimator_is_recorded_and_bad_input_names_the_field(tiny_folder, tmp_path: Path):  # type: ignore[no-untyped-def]
    from spectune.cli import app

    runner = CliRunner()
    _, folder = tiny_folder("bert")
    out = tmp_path / "analysis"
    res = runner.invoke(app, ["analyze", str(folder), "--out", str(out), "--esd", "none", "--no-report",
                              "--alpha-estimator", "farms"])
    assert res.exit_code == 0, res.output
    assert "alpha estimator farms" in flat(res.output)
    res = runner.invoke(app, ["plan", "--from-analysis", str(out), "--policy", "alpha-decay", "--set", "min_evals=10",
                              "--out", str(tmp_path / "p.yaml")])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert data["format_version"] == 2 and data["alpha_estimator"] == "farms" and data["wd_scale"]
    assert "wd_scale" in res.output
    res = runner.invoke(app, ["plan", "--from-analysis", str(out), "--alpha-estimator", "hill", "--out", str(tmp_path / "q.yaml")])
    assert res.exit_code == 2 and "fitted alpha with farms" in flat(res.output)
    res = runner.invoke(app, ["analyze", str(folder), "--out", str(tmp_path / "x"), "--alpha-estimator", "pareto"])
    assert res.exit_code != 0 and "alpha_estimator" in flat(res.output)
    res = runner.invoke(app, ["plan", str(folder), "--alpha-estimator", "pareto", "--out", str(tmp_path / "r.yaml")])
    assert res.exit_code != 0 and "alpha_estimator" in flat(res.output)
    res = runner.invoke(app, ["plan", str(folder), "--policy", "alpha-balance", "--set", "granularity=block",
                              "--set", "map=sigmoid", "--set", "min_evals=10", "--out", str(tmp_path / "s.yaml")])
    assert res.exit_code == 0, res.output
    tb = yaml.safe_load((tmp_path / "s.yaml").read_text())
    per_block: dict[str, set[float]] = {}
    for name, s in tb["lr_scale"].items():
        if ".layer." in name:
            per_block.setdefault(name.split(".layer.")[1].split(".")[0], set()).add(s)
    assert per_block and all(len(v) == 1 for v in per_block.values())
    newer = dict(data, format_version=3)
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(newer))
    with pytest.raises(PlanError, match="format_version"):
        Plan.load(tmp_path / "new.yaml")
    assert np.isfinite(list(tb["lr_scale"].values())).all()
