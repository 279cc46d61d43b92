"""``layer-pattern``: ranks by depth, and the size-matched control for spectral ranks."""

from __future__ import annotations

import math

import pytest

from spectune.analyze.result import COLUMNS, AnalysisResult
from spectune.plan import PlanError, plan
from spectune.plan.policies.layer_pattern import adapter_params


def _blocks(n_blocks: int) -> AnalysisResult:
    """q (32x32) and up (64x32) matrices in n_blocks blocks, with alphas and spikes that vary."""
    rows = []
    for b in range(n_blocks):
        for kind, shape in (("attn_q", (32, 32)), ("ffn_up", (64, 32))):
            row = {c: math.nan for c in COLUMNS}
            row.update(name=f"layers.{b}.{kind}.weight", module_type=kind, layer_index=b, rows=shape[0], cols=shape[1],
                       numel=shape[0] * shape[1], status="ok", note="", tied_to="", dtype="F32", n_evals=32,
                       alpha_hill=2.0 + 0.3 * b + (0.5 if kind == "ffn_up" else 0.0), num_spikes=(b * 7) % 5)
            rows.append(row)
    return AnalysisResult.from_rows(rows, source="hand-built")


def test_list_pattern_gives_each_share_of_the_blocks_its_rank():
    p = plan(_blocks(8), "layer-pattern", {"pattern": [2, 4, 6, 8]})
    ranks = p.lora.rank_pattern
    assert [ranks[f"layers.{b}.attn_q"] for b in range(8)] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert all(ranks[f"layers.{b}.ffn_up"] == ranks[f"layers.{b}.attn_q"] for b in range(8))
    assert p.lora.alpha_pattern["layers.7.attn_q"] == 16 and p.trainable == []


def test_increasing_and_decreasing_run_from_min_to_max():
    up = plan(_blocks(4), "layer-pattern", {"pattern": "increasing", "min_rank": 2, "max_rank": 8}).lora.rank_pattern
    down = plan(_blocks(4), "layer-pattern", {"pattern": "decreasing", "min_rank": 2, "max_rank": 8}).lora.rank_pattern
    assert [up[f"layers.{b}.attn_q"] for b in range(4)] == [2, 4, 6, 8]
    assert [down[f"layers.{b}.attn_q"] for b in range(4)] == [8, 6, 4, 2]


@pytest.mark.parametrize("pattern", ["uniform", "increasing", [1, 2]])
def test_matched_to_adaptive_ranks_total_adapter_parameters(pattern):
    table = _blocks(6)
    spectral = plan(table, "adaptive-rank", {"min_rank": 2, "max_rank": 16})
    sizes = {n.removesuffix(".weight"): r + c for n, r, c in zip(table.metrics["name"], table.metrics["rows"], table.metrics["cols"])}
    target = adapter_params({t: spectral.lora.rank_pattern.get(t, spectral.lora.r) for t in spectral.lora.target_modules}, sizes)
    control = plan(table, "layer-pattern", {"pattern": pattern, "match_params_of": "adaptive-rank",
                                            "match_params": {"min_rank": 2, "max_rank": 16}})
    got = adapter_params(control.lora.rank_pattern, sizes)
    assert abs(got - target) <= 0.05 * target and f"plan: {target:,})" in control.notes[0]
    if pattern == "uniform":  # one rank r for all: the r whose r * sum(rows + cols) is nearest the target
        (r,) = set(control.lora.rank_pattern.values())
        assert r == round(target / sum(sizes.values()))


def test_bad_patterns_are_errors_that_name_the_field():
    with pytest.raises(PlanError, match=r"pattern \[2, 4, 6\]: its 3 entries do not divide the 8 blocks"):
        plan(_blocks(8), "layer-pattern", {"pattern": [2, 4, 6]})
    with pytest.raises(PlanError, match="pattern"):
        plan(_blocks(8), "layer-pattern", {"pattern": [0, 2]})
    with pytest.raises(PlanError, match="match_params_of 'nope'"):
        plan(_blocks(8), "layer-pattern", {"match_params_of": "nope"})
