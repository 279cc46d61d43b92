"""``uncertainty: ignore | shrink | exclude`` on every alpha-driven policy.

Hand-built tables use equal standard errors s within a type, where the DerSimonian-Laird
estimate has a closed form: tau^2 = max(0, S^2 - s^2) with S^2 the sample variance of the
type's alphas, and each alpha moves to mu + tau^2 / (tau^2 + s^2) (a - mu), mu the plain
mean (docs/policies.md, "Uncertainty of alpha in plans"). Expected values below are
worked out from that form, not read back from the code.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from spectune.analyze.result import COLUMNS, AnalysisResult
from spectune.plan import PlanError, plan, plan_table
from spectune.plan.uncertainty import adjust, random_effects

# type "spread": alphas 2, 3, 4, 5 with s = 0.5: S^2 = 5/3, tau^2 = 5/3 - 1/4 = 17/12, factor 17/20
# type "tight": alphas 3.0, 3.1, 3.2, 3.3 with s = 0.5: S^2 = 1/60 < 1/4, tau^2 = 0: every alpha -> 3.15
# type "lone": one matrix
SPREAD = [2.0, 3.0, 4.0, 5.0]
TIGHT = [3.0, 3.1, 3.2, 3.3]


def table(rows: list[dict]) -> AnalysisResult:
    full = []
    for r in rows:
        row = {c: math.nan for c in COLUMNS}
        row.update(status="ok", note="", tied_to="", dtype="F32", rows=8, cols=8, numel=64, n_evals=100,
                   alpha_estimator="hill", alpha_uncertainty="asymptotic", alpha_hill_flags="", alpha_flags="")
        row.update(r)
        full.append(row)
    return AnalysisResult.from_rows(full, source="hand-built")


def rows(flags: dict[str, str] | None = None) -> list[dict]:
    out = []
    for kind, alphas in (("ffn_up", SPREAD), ("attn_q", TIGHT)):
        for i, a in enumerate(alphas):
            name = f"l.{i}.{kind}.weight"
            out.append({"name": name, "module_type": kind, "layer_index": i, "alpha_hill": a, "alpha_hill_se": 0.5,
                        "alpha_hill_flags": (flags or {}).get(name, "")})
    out.append({"name": "emb.weight", "module_type": "embedding", "alpha_hill": 2.5, "alpha_hill_se": 0.1})
    return out


def test_equal_errors_give_the_closed_form():
    mu, tau2 = random_effects(np.array(SPREAD), np.full(4, 0.5))
    assert (mu, tau2) == pytest.approx((3.5, 5 / 3 - 0.25))
    assert random_effects(np.array(TIGHT), np.full(4, 0.5)) == pytest.approx((3.15, 0.0))


def test_shrink_keeps_a_spread_beyond_the_noise_and_collapses_one_inside_it():
    metrics = table(rows()).metrics
    values = metrics.set_index("name")["alpha_hill"]
    with pytest.warns(UserWarning, match="module type 'embedding' has a single matrix .*exclude used for it"):
        out = adjust(metrics, values, "alpha_hill", "shrink")
    factor = (5 / 3 - 0.25) / (5 / 3)
    for i, a in enumerate(SPREAD):
        assert out.values[f"l.{i}.ffn_up.weight"] == pytest.approx(3.5 + factor * (a - 3.5), rel=1e-12)
    assert [out.values[f"l.{i}.attn_q.weight"] for i in range(4)] == pytest.approx([3.15] * 4, rel=1e-12)
    assert out.values["emb.weight"] == 2.5 and out.excluded == []  # the lone unflagged matrix keeps its alpha
    assert out.tau2 == pytest.approx({"attn_q": 0.0, "ffn_up": 5 / 3 - 0.25})


def test_a_flagged_fit_takes_its_type_mean_and_does_not_move_it():
    flags = {"l.3.ffn_up.weight": "not_power_law"}
    metrics = table(rows(flags)).metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = adjust(metrics, metrics.set_index("name")["alpha_hill"], "alpha_hill", "shrink")
    # the three trusted alphas 2, 3, 4: S^2 = 1, tau^2 = 0.75, mu = 3
    assert out.values["l.3.ffn_up.weight"] == pytest.approx(3.0)
    assert out.values["l.0.ffn_up.weight"] == pytest.approx(3.0 + 0.75 / 1.0 * (2.0 - 3.0))


def test_exclude_leaves_flagged_matrices_at_the_base_rate():
    flags = {"l.0.ffn_up.weight": "degenerate", "l.1.ffn_up.weight": "not_power_law"}
    result = table(rows(flags))
    base = plan(result, "alpha-balance", {})
    ex = plan(result, "alpha-balance", {"uncertainty": "exclude"})
    assert ex.lr_scale["l.0.ffn_up.weight"] == ex.lr_scale["l.1.ffn_up.weight"] == 1.0
    assert {"l.0.ffn_up.weight", "l.1.ffn_up.weight"} <= set(ex.excluded)
    assert base.lr_scale["l.0.ffn_up.weight"] == 0.5  # the lowest alpha, as fitted
    only = plan(result, "alpha-balance", {"uncertainty": "exclude", "uncertainty_flags": ["degenerate"]})
    assert only.lr_scale["l.0.ffn_up.weight"] == 1.0 and only.lr_scale["l.1.ffn_up.weight"] != 1.0
    assert any("2 of 9 matrices with a flagged alpha_hill fit" in n for n in ex.notes)
    assert any(n.startswith("uncertainty exclude: ") and "decisions differ from uncertainty: ignore" in n for n in ex.notes)


@pytest.mark.parametrize("policy,params", [
    ("alpha-balance", {}),
    ("alpha-balance", {"granularity": "block", "map": "sqrt"}),  # (linear: these block means shift affinely, same rates)
    ("alpha-balance", {"granularity": "block", "map": "sigmoid"}),
    ("alpha-decay", {}),
    ("adaptive-rank", {}),
    ("by-type", {"like": "alpha-balance"}),
])
def test_every_alpha_policy_takes_the_rule(policy, params):
    """shrink collapses the tight type: its matrices get one decision; ignore keeps them apart."""
    result = table([dict(r, num_spikes=i % 3) for i, r in enumerate(rows())])
    tight = [f"l.{i}.attn_q.weight" for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ignore = plan(result, policy, params)
        shrink = plan(result, policy, {**params, "uncertainty": "shrink"})
    if policy == "alpha-decay":
        assert len({shrink.wd_scale[n] for n in tight}) == 1 < len({ignore.wd_scale[n] for n in tight})
    elif policy == "adaptive-rank":
        assert shrink.lora is not None and ignore.lora is not None and shrink.lora != ignore.lora
    elif policy == "by-type":
        assert any(n.startswith("like alpha-balance: uncertainty shrink") for n in shrink.notes)
        assert shrink.lr_scale != ignore.lr_scale
    elif params.get("granularity") == "block":
        assert shrink.lr_scale != ignore.lr_scale  # block means of the shrunk alphas
    else:
        assert len({shrink.lr_scale[n] for n in tight}) == 1 < len({ignore.lr_scale[n] for n in tight})
    table_ = plan_table(shrink, result)
    assert {"alpha_hill_lo", "alpha_hill_hi", "alpha_hill_flags", "alpha_used"} <= set(table_.columns)


def test_bad_rules_name_the_field():
    result = table(rows())
    with pytest.raises(PlanError, match=r"uncertainty: Input should be 'ignore', 'shrink' or 'exclude'"):
        plan(result, "alpha-balance", {"uncertainty": "bayes"})
    with pytest.raises(PlanError, match=r"uncertainty_flags: unknown flag\(s\) noisy"):
        plan(result, "alpha-decay", {"uncertainty_flags": ["noisy"]})
    old = table(rows())
    old.metrics = old.metrics.drop(columns=["alpha_hill_se"])
    with pytest.raises(PlanError, match="no alpha_hill_se column .* analyze the model again"):
        plan(old, "alpha-balance", {"uncertainty": "shrink"})
    assert plan(old, "alpha-balance", {}).lr_scale  # ignore needs no interval


@pytest.mark.integration
def test_shrink_on_minilm_moves_exactly_what_the_intervals_say():
    """MiniLM, KS alpha: each matrix moves toward its type's mean by its own variance against the type's spread.

    Recomputed here from the table's alpha, alpha_se and alpha_flags alone: per module type,
    w = 1 / se^2 over the unflagged fits, Cochran's Q = sum w (a - mean_w)^2 and
    tau^2 = max(0, (Q - (k - 1)) / (sum w - sum w^2 / sum w)). Where tau^2 = 0 (the spread lies
    inside the intervals) every matrix of the type must get one rate; elsewhere each unflagged
    alpha keeps the share tau^2 / (tau^2 + se^2) of its distance to the type mean (less for a
    wider interval) and a flagged one sits at the mean.
    """
    import spectune

    result = spectune.analyze("minilm", progress=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ignore = plan(result, "alpha-balance", {"metric": "alpha"})
        shrink = plan(result, "alpha-balance", {"metric": "alpha", "uncertainty": "shrink"})
    m = result.ok[pd.to_numeric(result.ok["n_evals"]) >= 50].set_index("name")
    used = plan_table(shrink, result).set_index("name")["alpha_used"]
    collapsed = kept = 0
    for kind, g in m.groupby("module_type"):
        trusted = g[g["alpha_flags"] == ""]
        if len(g) < 2 or len(trusted) < 2:
            continue
        a, se = trusted["alpha"].to_numpy(float), trusted["alpha_se"].to_numpy(float)
        w = 1 / se**2
        q = float(np.sum(w * (a - np.sum(w * a) / np.sum(w)) ** 2))
        tau2 = max(0.0, (q - (len(a) - 1)) / (np.sum(w) - np.sum(w**2) / np.sum(w)))
        mu = float(np.sum(a / (se**2 + tau2)) / np.sum(1 / (se**2 + tau2)))
        expected = {n: mu + tau2 / (tau2 + s**2) * (x - mu) for n, x, s in zip(trusted.index, a, se)}
        expected.update({n: mu for n in g.index if n not in trusted.index})
        assert used[list(expected)].to_numpy() == pytest.approx(list(expected.values()), rel=1e-9), kind
        scales = {shrink.lr_scale[n] for n in g.index}
        if tau2 == 0:
            assert len(scales) == 1, kind
            collapsed += 1
        else:
            assert len(scales) > 1, kind
            kept += 1
    assert collapsed >= 1 and kept >= 1
    moved = [n for n in m.index if math.isfinite(used.get(n, math.nan))
             and not math.isclose(used[n], m.loc[n, "alpha"], abs_tol=1e-9)]
    assert any(f"{len(moved)} of " in n and "moved toward their module type's mean" in n for n in shrink.notes)
    assert shrink.lr_scale != ignore.lr_scale
