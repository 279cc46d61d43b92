"""Policies on hand-built analysis tables: exact values, direction, bounds, all-equal, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectune.analyze.result import COLUMNS, AnalysisResult
from spectune.plan import Plan, PlanError, apply_trainable, axolotl_fragment, param_groups, peft_kwargs, plan


def table(rows: list[dict]) -> AnalysisResult:
    full = []
    for r in rows:
        row = {c: math.nan for c in COLUMNS}
        row.update(status="ok", note="", tied_to="", dtype="F32", rows=8, cols=8, numel=64, n_evals=100, layer_index=0)
        row.update(r)
        full.append(row)
    return AnalysisResult.from_rows(full, source="hand-built")


SVD = table(
    [
        {"name": "l.0.q.weight", "module_type": "attn_q", "svd_metric": 0.1, "ce_metric": 4.0, "cs_metric": 0.0},
        {"name": "l.1.q.weight", "module_type": "attn_q", "svd_metric": 0.3, "ce_metric": 5.0, "cs_metric": 0.5},
        {"name": "l.2.q.weight", "module_type": "attn_q", "svd_metric": 0.5, "ce_metric": 6.0, "cs_metric": 1.0},
        {"name": "l.3.q.weight", "module_type": "attn_q", "svd_metric": math.nan, "ce_metric": math.nan, "cs_metric": math.nan},
    ]
)


def test_phased_bounded_exact_values_and_direction():
    p = plan(SVD, "phased", {"phase": "svd"})
    # M = (0, 0.5, 1) -> s = 1 - M, floored at 0.1
    assert p.lr_scale["l.0.q.weight"] == pytest.approx(1.0)
    assert p.lr_scale["l.1.q.weight"] == pytest.approx(0.5)
    assert p.lr_scale["l.2.q.weight"] == pytest.approx(0.1)
    assert p.lr_scale["l.3.q.weight"] == 1.0 and p.excluded == ["l.3.q.weight"]  # NaN keeps base rate, listed
    ce = plan(SVD, "phased", {"phase": "ce", "beta": 0.5})
    assert [ce.lr_scale[f"l.{i}.q.weight"] for i in range(3)] == pytest.approx([1.0, 0.75, 0.5])
    cs = plan(SVD, "phased", {"phase": "cs", "gamma": 0.8})
    # high CS -> higher rate: s = 1 - 0.8 (1 - M)
    assert [cs.lr_scale[f"l.{i}.q.weight"] for i in range(3)] == pytest.approx([0.2, 0.6, 1.0])


@pytest.mark.parametrize(
    "variant,phase,expected",
    [
        ("section2", "svd", [0.1, 0.5, 1.0]),  # 1 - (1 - M): literal, lower rate for LOW metric (floored)
        ("section3", "cs", [1.0, 1.5, 2.0]),  # 1 + M: above base, as the seed's section 3 writes
        ("appendix", "svd", [1.0, 0.5, 0.1]),  # 1 - M, extreme layer lifted from 0 by the floor
        ("appendix", "cs", [0.1, 0.5, 1.0]),  # M
    ],
)
def test_phased_seed_variants(variant, phase, expected):  # type: ignore[no-untyped-def]
    p = plan(SVD, "phased", {"phase": phase, "variant": variant})
    assert [p.lr_scale[f"l.{i}.q.weight"] for i in range(3)] == pytest.approx(expected)


def test_phased_floor_zero_reproduces_freezing_and_schedule_cycles():
    p = plan(SVD, "phased", {"phase": "svd", "floor": 0.0})
    assert p.lr_scale["l.2.q.weight"] == 0.0
    phases = [plan(SVD, "phased", {"epoch": e}).notes[0].split()[1] for e in range(4)]
    assert phases == ["svd", "ce", "cs", "svd"]


def test_bounds_never_above_base_never_below_floor():
    rng = np.random.default_rng(0)
    rows = [
        {"name": f"l.{i}.w.weight", "module_type": "ffn_up", "svd_metric": v, "ce_metric": v * 3, "cs_metric": -v}
        for i, v in enumerate(rng.random(40))
    ]
    t = table(rows)
    for phase in ("svd", "ce", "cs"):
        for k in (0.3, 1.0):
            p = plan(t, "phased", {"phase": phase, "alpha": k, "beta": k, "gamma": k, "floor": 0.2})
            v = np.array(list(p.lr_scale.values()))
            assert v.max() <= 1.0 and v.min() >= 0.2


def test_all_equal_metric_gives_uniform_scale_with_warning():
    t = table([{"name": f"l.{i}.w.weight", "module_type": "attn_q", "svd_metric": 0.3} for i in range(3)])
    with pytest.warns(UserWarning, match="all svd_metric values are equal"):
        p = plan(t, "phased", {"phase": "svd"})
    assert set(p.lr_scale.values()) == {1.0}


def test_alpha_balance_maps():
    rows = [{"name": f"l.{i}.w.weight", "module_type": "attn_q", "alpha_hill": a} for i, a in enumerate([2.0, 4.0, 8.0])]
    rows.append({"name": "small.weight", "module_type": "attn_q", "alpha_hill": 100.0, "n_evals": 10})
    t = table(rows)
    lin = plan(t, "alpha-balance")
    assert [lin.lr_scale[f"l.{i}.w.weight"] for i in range(3)] == pytest.approx([0.5, 0.5 + 1 / 3, 1.5])
    assert lin.lr_scale["small.weight"] == 1.0 and "small.weight" in lin.excluded
    log = plan(t, "alpha-balance", {"map": "log2"})  # log2: 1, 2, 3 -> 0, .5, 1
    assert [log.lr_scale[f"l.{i}.w.weight"] for i in range(3)] == pytest.approx([0.5, 1.0, 1.5])
    sq = plan(t, "alpha-balance", {"map": "sqrt"})
    x = (math.sqrt(4) - math.sqrt(2)) / (math.sqrt(8) - math.sqrt(2))
    assert sq.lr_scale["l.1.w.weight"] == pytest.approx(0.5 + x)
    rk = plan(t, "alpha-balance", {"map": "rank", "lr_min_ratio": 0.8, "lr_max_ratio": 1.2})
    assert [rk.lr_scale[f"l.{i}.w.weight"] for i in range(3)] == pytest.approx([0.8, 1.0, 1.2])


AR = table(
    [
        {"name": "m.0.q.weight", "module_type": "attn_q", "alpha_hill": 2.0, "num_spikes": 10},  # score 0
        {"name": "m.1.q.weight", "module_type": "attn_q", "alpha_hill": 3.0, "num_spikes": 5},  # .35 + .15
        {"name": "m.2.q.weight", "module_type": "attn_q", "alpha_hill": 4.0, "num_spikes": 0},  # 1
        {"name": "m.3.q.weight", "module_type": "attn_q", "alpha_hill": 4.0, "num_spikes": 10},  # .7
        {"name": "emb.weight", "module_type": "embedding", "alpha_hill": 9.0, "num_spikes": 0},
    ]
)


def test_adaptive_rank_selects_highest_need_and_interpolates():
    p = plan(AR, "adaptive-rank", {"top_fraction": 0.5, "min_rank": 4, "max_rank": 64})
    lora = p.lora
    assert lora is not None
    # top 2 of 4 block matrices by score: m.2 (1.0) and m.3 (0.7); embedding is not a candidate
    assert lora.target_modules == ["m.2.q", "m.3.q"]
    assert lora.rank_pattern == {"m.2.q": 64, "m.3.q": 4}
    assert lora.alpha_pattern == {"m.2.q": 128, "m.3.q": 8}
    low = plan(AR, "adaptive-rank", {"top_fraction": 0.5, "select": "lowest"})
    assert low.lora is not None and low.lora.target_modules == ["m.0.q", "m.1.q"]
    three = plan(AR, "adaptive-rank", {"top_fraction": 0.75, "min_rank": 4, "max_rank": 64, "scaling": "log"})
    # selected scores 1, .7, .5 -> positions 1, .4, 0; log interpolation: 4 * 16^0.4 = 12.1
    assert three.lora is not None and three.lora.rank_pattern == {"m.2.q": 64, "m.3.q": 12, "m.1.q": 4}


def test_select_top_fraction_per_type():
    rows = [{"name": f"b.{i}.q.weight", "module_type": "attn_q", "snr": float(i)} for i in range(4)]
    rows += [{"name": f"b.{i}.up.weight", "module_type": "ffn_up", "snr": float(-i)} for i in range(4)]
    rows += [{"name": "emb.weight", "module_type": "embedding", "snr": 99.0}]
    p = plan(table(rows), "select", {"top_fraction": 0.5})
    assert p.trainable == ["b.0.up.weight", "b.1.up.weight", "b.2.q.weight", "b.3.q.weight"]
    p2 = plan(table(rows), "select", {"top_fraction": 0.25, "include_embeddings": True})
    assert "emb.weight" in (p2.trainable or [])


def test_random_select_matches_select_sizes_and_varies_with_seed():
    rows = [{"name": f"b.{i}.q.weight", "module_type": "attn_q", "snr": float(i)} for i in range(8)]
    rows += [{"name": f"b.{i}.up.weight", "module_type": "ffn_up", "snr": float(i)} for i in range(8)]
    chosen = []
    for seed in range(6):
        p = plan(table(rows), "random-select", {"top_fraction": 0.25, "seed": seed})
        picks = p.trainable or []
        assert sum(".q." in n for n in picks) == 2 and sum(".up." in n for n in picks) == 2  # select's counts
        assert p.trainable == plan(table(rows), "random-select", {"top_fraction": 0.25, "seed": seed}).trainable
        chosen.append(tuple(picks))
    assert len(set(chosen)) > 1  # 6 seeds drawing 2 of 8 twice: all equal has probability ~1e-14


def test_stable_rank_split():
    rows = [{"name": f"b.{i}.q.weight", "module_type": "attn_q", "stable_rank": float(i + 1)} for i in range(4)]
    p = plan(table(rows), "stable-rank", {"quantile": 0.5})
    # median of 1..4 is 2.5: ranks 1, 2 -> LoRA; 3, 4 -> full
    assert p.trainable == ["b.2.q.weight", "b.3.q.weight"]
    assert p.lora is not None and p.lora.target_modules == ["b.0.q", "b.1.q"]


def test_plans_are_deterministic_and_round_trip(tmp_path):  # type: ignore[no-untyped-def]
    a = plan(AR, "adaptive-rank")
    b = plan(AR, "adaptive-rank")
    assert a.to_yaml() == b.to_yaml()
    path = a.save(tmp_path / "plan.yaml")
    assert Plan.load(path) == a


def test_hand_edited_nonsense_is_rejected_naming_the_key(tmp_path):  # type: ignore[no-untyped-def]
    p = plan(AR, "adaptive-rank")
    data = p.model_dump(mode="json")
    data["lora"]["rank_pattern"]["m.2.q"] = -3
    with pytest.raises(PlanError, match=r"lora\.rank_pattern.*'m\.2\.q' is -3"):
        Plan.from_dict(data)
    data = plan(SVD, "phased").model_dump(mode="json")
    data["lr_scale"]["l.0.q.weight"] = 3.0
    with pytest.raises(PlanError, match=r"lr_scale\['l\.0\.q\.weight'\] = 3\.0 is outside"):
        Plan.from_dict(data)
    data = plan(SVD, "phased").model_dump(mode="json")
    data["format_version"] = 99
    with pytest.raises(PlanError, match="format version 99"):
        Plan.from_dict(data)
    with pytest.raises(PlanError, match="unknown policy 'nope'"):
        plan(SVD, "nope")
    with pytest.raises(PlanError, match="max_rnk"):
        plan(AR, "adaptive-rank", {"max_rnk": 3})


# --- applying plans to real torch / PEFT models -------------------------------------------


def _tiny_llama():  # type: ignore[no-untyped-def]
    from tests.conftest import tiny_model

    return tiny_model("llama")


def test_peft_export_gives_every_module_its_planned_rank_and_alpha():
    import spectune
    from peft import LoraConfig, get_peft_model

    model = _tiny_llama()
    res = spectune.analyze(model, progress=False)
    p = plan(res, "adaptive-rank", {"top_fraction": 0.5, "min_rank": 2, "max_rank": 16})
    assert p.lora is not None and len(set(p.lora.rank_pattern.values())) > 2
    peft_model = get_peft_model(model, LoraConfig(**peft_kwargs(p)))
    seen = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            seen[short] = (mod.r["default"], mod.lora_alpha["default"])
    assert set(seen) == set(p.lora.target_modules)
    for t in p.lora.target_modules:
        assert seen[t] == (p.lora.rank_pattern[t], p.lora.alpha_pattern[t]), t


def test_param_groups_rates_names_and_one_d_rule():
    import spectune

    model = _tiny_llama()
    res = spectune.analyze(model, progress=False)
    p = plan(res, "phased", {"phase": "svd"})
    groups = param_groups(model, p, base_lr=1e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    for name, s in p.lr_scale.items():
        assert by_name[name]["lr"] == pytest.approx(1e-3 * s)
        assert by_name[name]["weight_decay"] == 0.01
    norm = by_name["model.layers.0.input_layernorm.weight"]
    assert norm["lr"] == pytest.approx(1e-3) and norm["weight_decay"] == 0.0
    torch.optim.AdamW(groups)  # torch accepts the groups as built


def test_param_groups_match_a_prefixed_task_model_and_reject_a_foreign_one():
    import spectune
    from tests.conftest import tiny_model

    bert = tiny_model("bert")
    p = plan(spectune.analyze(bert, progress=False), "phased", {"phase": "svd"})
    import transformers as tf

    task = tf.BertForSequenceClassification(bert.config)
    groups = {g["name"]: g for g in param_groups(task, p, 1.0)}
    assert groups["bert.encoder.layer.0.attention.self.query.weight"]["lr"] == pytest.approx(
        p.lr_scale["encoder.layer.0.attention.self.query.weight"]
    )
    assert groups["bert.encoder.layer.0.attention.self.query.bias"]["lr"] == pytest.approx(
        p.lr_scale["encoder.layer.0.attention.self.query.weight"]
    )
    assert groups["classifier.weight"]["lr"] == 1.0  # unknown to the plan: base rate
    with pytest.raises(PlanError, match="plan does not match the model: 16 of 16 .* first: embeddings"):
        param_groups(_tiny_llama(), p, 1.0)


def test_apply_trainable_freezes_unselected_matrices():
    import spectune

    model = _tiny_llama()
    p = plan(spectune.analyze(model, progress=False), "select", {"top_fraction": 0.5})
    names = apply_trainable(model, p)
    matrices = [n for n in names if n in p.lr_scale]
    assert sorted(matrices) == sorted(p.trainable or [])


def test_axolotl_fragment_is_yaml_with_patterns_and_groups():
    import yaml

    frag = axolotl_fragment(plan(AR, "adaptive-rank"))
    data = yaml.safe_load(frag)
    assert data["lora_rank_pattern"][r"^m\.2\.q$"] == 64
    assert data["unfrozen_parameters"] == []
    frag2 = yaml.safe_load(axolotl_fragment(plan(SVD, "phased", {"phase": "svd"}), base_lr=1e-4))
    lrs = sorted(g["lr"] for g in frag2["lr_groups"])
    assert lrs == pytest.approx([1e-5, 5e-5])


def test_normalize_mean_gives_a_parameter_weighted_mean_of_one_under_the_cap():
    from spectune.plan.policies._common import normalize_mean

    scales = {"a": 0.5, "b": 1.0, "c": 0.1, "frozen": 0.0}
    sizes = {"a": 100, "b": 300, "c": 600, "frozen": 50}
    out = normalize_mean(scales, sizes, cap=4.0)
    w = np.array([sizes[k] for k in scales], float)
    v = np.array([out[k] for k in scales])
    assert (w * v).sum() / w.sum() == pytest.approx(1.0, abs=1e-9)
    c = 1050 / (0.5 * 100 + 1.0 * 300 + 0.1 * 600)  # no scale reaches the cap: one common factor, by hand
    assert [out[k] for k in "abc"] == pytest.approx([0.5 * c, 1.0 * c, 0.1 * c], rel=1e-9) and out["frozen"] == 0.0
    capped = normalize_mean({"x": 1.0, "y": 0.01}, {"x": 1, "y": 1}, cap=1.5)
    assert capped["x"] == pytest.approx(1.5) and capped["y"] == pytest.approx(0.5, rel=1e-9)  # y takes up the rest
    with pytest.raises(ValueError, match="cannot reach 1"):
        normalize_mean({"x": 1.0, "y": 0.0}, {"x": 1, "y": 3}, cap=2.0)


def test_rate_policies_normalize_to_mean_one_and_keep_their_pattern():
    rows = [{"name": f"l.{i}.w.weight", "module_type": "attn_q", "alpha_hill": a, "numel": n}
            for i, (a, n) in enumerate([(2.0, 64), (4.0, 256), (8.0, 1024)])]
    t = table(rows)
    raw = plan(t, "alpha-balance")
    norm = plan(t, "alpha-balance", {"normalize": "mean"})
    sizes = {r["name"]: r["numel"] for r in rows}
    mean = sum(sizes[k] * v for k, v in norm.lr_scale.items()) / sum(sizes.values())
    assert mean == pytest.approx(1.0, abs=1e-6)
    ratio = [norm.lr_scale[k] / raw.lr_scale[k] for k in raw.lr_scale]
    assert max(ratio) == pytest.approx(min(ratio), rel=1e-5)  # one factor: the per-layer pattern is unchanged
    assert "normalize: mean" in norm.notes[-1] and norm.max_scale == 4.0
    ph = plan(SVD, "phased", {"normalize": "mean", "max_scale": 1.5})
    assert max(ph.lr_scale.values()) <= 1.5 + 1e-9
    with pytest.raises(PlanError, match="max_scale"):
        plan(SVD, "phased", {"normalize": "mean", "max_scale": 0.5})
