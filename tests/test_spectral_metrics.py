"""Per-matrix spectral metrics against closed forms.

Every test matrix is W = U diag(s) V^T with U, V orthonormal (QR of seeded
Gaussians) and s chosen, so each metric has a closed form in s that this file
computes with its own code (``closed_form`` below) and never by calling spectune.

Routes checked: the full engine (``spectune.analyze`` on a module), and
``compute.eigenvalues`` (method 'gram' and 'svd') followed by
``spectral.norm_metrics``.

Tolerances:
- float64 weights, float64 spectrum: relative 1e-10 (Gram eigenvalues carry an
  absolute error ~ eps64 * lambda_max; our smallest non-zero lambda is 1/100 of the
  largest, so 1e-10 leaves four orders of margin). Rank-deficient case: an exact zero
  singular value comes back from the Gram as sqrt(rounding noise) ~ 1e-8 s_max, so the
  metrics linear in s (svd_metric, mean_singular_value) are held to relative 1e-7 and
  condition_number only to "> 1e6" (it is infinite in exact arithmetic).
- float32 weights: the stored matrix differs from U diag(s) V^T by float32 rounding,
  which moves each singular value by at most ||E||_2 ~ 1e-7 * s_max; against the
  closed form relative 1e-5, against float64 numpy SVD of the stored float32 values
  relative 1e-10.
- bfloat16 weights: rounding of 2^-9 per entry moves singular values by ~1e-2
  relative; against the closed form relative 5e-2 (norm-like metrics only), against
  numpy SVD of the stored bfloat16 values relative 1e-10.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spectune
from spectune.analyze import compute, spectral

F32_EPS = float(np.finfo(np.float32).eps)

NORM_KEYS = [
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "top_eig_ratio",
    "effective_rank",
    "spectral_entropy",
    "log_norm",
    "log_spectral_norm",
    "condition_number",
    "svd_metric",
    "mean_singular_value",
]

# metrics that depend on the singular values only through s^2 (exact through the Gram route
# even where s = 0) and those linear in s (where an exact zero comes back as rounding noise)
SQUARED_KEYS = [
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "top_eig_ratio",
    "effective_rank",
    "spectral_entropy",
    "log_norm",
    "log_spectral_norm",
]
LINEAR_KEYS = ["svd_metric", "mean_singular_value"]


# --- construction and closed forms (independent of spectune) --------------------------


def orthonormal(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """n x k matrix with orthonormal columns, from QR of a Gaussian."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def build(s: np.ndarray, rows: int, cols: int, seed: int) -> np.ndarray:
    """rows x cols float64 matrix with singular values exactly s (len(s) = min(rows, cols))."""
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    assert s.size == k
    u = orthonormal(rows, k, rng)
    v = orthonormal(cols, k, rng)
    return (u * s) @ v.T


def closed_form(s: np.ndarray, rows: int, cols: int) -> dict[str, float]:
    """Every norm metric written directly from the singular values (any order)."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]  # descending
    n = s.size
    s_max = s[0]
    sq = s**2
    total = sq.sum()
    tol = s_max * max(rows, cols) * F32_EPS  # numpy.linalg.matrix_rank's rule at float32 eps
    rank = int(sum(1 for x in s if x > tol))
    p = np.array([x / total for x in sq if x > 0])
    entropy = -sum(pi * math.log(pi) for pi in p)
    svd_metric = sum((i / n) * (s[i - 1] / s.sum()) for i in range(1, n + 1))
    return {
        "n_evals": n,
        "numerical_rank": rank,
        "frobenius_norm": math.sqrt(total),
        "spectral_norm": s_max,
        "stable_rank": total / s_max**2,
        "top_eig_ratio": s_max**2 / total,
        "effective_rank": math.exp(entropy),
        "spectral_entropy": entropy / math.log(rank),
        "log_norm": math.log10(total),
        "log_spectral_norm": math.log10(s_max**2),
        "condition_number": s_max / s[-1] if s[-1] > 0 else math.inf,
        "svd_metric": svd_metric,
        "mean_singular_value": s.mean(),
    }


def numpy_svals(w: torch.Tensor) -> np.ndarray:
    """Reference singular values of exactly the stored values (upcast to float64)."""
    return np.linalg.svd(w.to(torch.float64).numpy(), compute_uv=False)


# --- the cases ------------------------------------------------------------------------

CASES = {
    # name: (rows, cols, s) -- s has min(rows, cols) entries
    "square": (48, 48, np.linspace(0.5, 5.0, 48)),
    "tall": (120, 40, np.geomspace(0.5, 5.0, 40)),
    "wide": (40, 120, np.concatenate([[9.0, 6.0, 4.0], np.linspace(0.9, 1.1, 37)])),
    # rank 30 of 40: ten exact zero singular values
    "rank_deficient": (100, 40, np.concatenate([np.linspace(1.0, 3.0, 30), np.zeros(10)])),
}
FULL_RANK = ["square", "tall", "wide"]


class Holder(torch.nn.Module):
    """A module whose only parameters are the given matrices, in order."""

    def __init__(self, mats: list[torch.Tensor]) -> None:
        super().__init__()
        for i, m in enumerate(mats):
            self.register_parameter(f"m{i}", torch.nn.Parameter(m, requires_grad=False))


def tensor(case: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    rows, cols, s = CASES[case]
    return torch.from_numpy(build(s, rows, cols, seed)).to(dtype)


def assert_metrics(got: dict, expected: dict, keys: list[str], rtol: float) -> None:
    for k in keys:
        e, g = expected[k], float(got[k])
        if math.isinf(e):
            assert math.isinf(g), (k, g, e)
        else:
            assert g == pytest.approx(e, rel=rtol, abs=0), (k, g, e)


# --- sanity of the test's own construction -------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_construction_has_the_chosen_singular_values(case):
    rows, cols, s = CASES[case]
    w = build(s, rows, cols, seed=0)
    assert w.shape == (rows, cols)
    np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False), np.sort(s)[::-1], rtol=0, atol=1e-13 * s.max())


def test_closed_form_matches_hand_values():
    # s = (3, 4): sum s^2 = 25, p = (9/25, 16/25)
    cf = closed_form(np.array([3.0, 4.0]), 2, 2)
    h = -(0.36 * math.log(0.36) + 0.64 * math.log(0.64))
    assert cf["frobenius_norm"] == pytest.approx(5.0)
    assert cf["stable_rank"] == pytest.approx(25 / 16)
    assert cf["effective_rank"] == pytest.approx(math.exp(h))
    assert cf["spectral_entropy"] == pytest.approx(h / math.log(2))
    assert cf["svd_metric"] == pytest.approx(0.5 * 4 / 7 + 1.0 * 3 / 7)
    assert cf["condition_number"] == pytest.approx(4 / 3)
    assert cf["log_spectral_norm"] == pytest.approx(math.log10(16))


# --- engine ---------------------------------------------------------------------------


def engine_row(w: torch.Tensor, **opts) -> dict:
    res = spectune.analyze(Holder([w]), progress=False, device="cpu", **opts)
    assert len(res.metrics) == 1
    return res.metrics.iloc[0].to_dict()


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_float64_closed_form(case, method):
    rows, cols, s = CASES[case]
    row = engine_row(tensor(case, torch.float64), method=method)
    expected = closed_form(s, rows, cols)
    assert row["status"] == "ok"
    assert (row["rows"], row["cols"]) == (rows, cols)
    assert int(row["n_evals"]) == expected["n_evals"]
    assert int(row["numerical_rank"]) == expected["numerical_rank"]
    if case in FULL_RANK:
        assert_metrics(row, expected, NORM_KEYS, rtol=1e-10)
    else:
        assert_metrics(row, expected, SQUARED_KEYS, rtol=1e-10)
        # metrics linear in s see the exact zeros as sqrt of the Gram's rounding noise
        # (~sqrt(eps64) * s_max ~ 1e-8 each): relative 1e-7
        assert_metrics(row, expected, LINEAR_KEYS, rtol=1e-7)
        # exact zeros come back as rounding noise (Gram: ~sqrt(eps64) s_max; SVD: ~eps64 s_max)
        # or as exact zeros: either way the ratio must be enormous
        assert row["condition_number"] > 1e6


@pytest.mark.parametrize("case", list(CASES))
def test_engine_float32_weights(case):
    rows, cols, s = CASES[case]
    w = tensor(case, torch.float32)
    row = engine_row(w)
    keys = NORM_KEYS if case in FULL_RANK else SQUARED_KEYS
    expected = closed_form(s, rows, cols)
    assert int(row["numerical_rank"]) == expected["numerical_rank"]
    assert_metrics(row, expected, keys, rtol=1e-5)
    # and tightly against the singular values of exactly the stored float32 values
    ref = closed_form(numpy_svals(w), rows, cols)
    assert_metrics(row, ref, keys, rtol=1e-10)
    if case not in FULL_RANK:
        # the ten zero singular values are float32 rounding noise (~1e-7 s_max) in the stored
        # matrix; a mean over them agrees with the closed form to ~1e-7, not better
        assert_metrics(row, expected, LINEAR_KEYS, rtol=1e-6)
    assert row["dtype"] == "float32"


@pytest.mark.parametrize("case", FULL_RANK)
def test_engine_bfloat16_weights(case):
    rows, cols, s = CASES[case]
    w = tensor(case, torch.bfloat16)
    row = engine_row(w)
    assert row["dtype"] == "bfloat16"
    ref = closed_form(numpy_svals(w), rows, cols)
    assert int(row["numerical_rank"]) == ref["numerical_rank"]
    assert_metrics(row, ref, NORM_KEYS, rtol=1e-10)
    loose = ["frobenius_norm", "spectral_norm", "stable_rank", "top_eig_ratio", "effective_rank",
             "spectral_entropy", "log_norm", "log_spectral_norm", "svd_metric", "mean_singular_value"]
    assert_metrics(row, closed_form(s, rows, cols), loose, rtol=5e-2)


@pytest.mark.parametrize("case", FULL_RANK)
def test_engine_float32_spectrum_precision(case):
    """dtype='float32' computes the Gram in single precision: relative 1e-4 is what it can give."""
    rows, cols, s = CASES[case]
    row = engine_row(tensor(case, torch.float64), dtype="float32")
    assert_metrics(row, closed_form(s, rows, cols), NORM_KEYS, rtol=1e-4)


def test_engine_several_matrices_in_one_group_and_across_groups():
    """Same-shape matrices share one batched eigensolve: each row must keep its own spectrum."""
    specs = [
        ("tall", 0),
        ("tall", 1),
        ("square", 2),
        ("tall", 3),
        ("wide", 4),
    ]
    scale = [1.0, 2.0, 1.0, 0.25, 3.0]
    mats = [tensor(c, torch.float64, seed) * f for (c, seed), f in zip(specs, scale)]
    res = spectune.analyze(Holder(mats), progress=False, device="cpu")
    m = res.metrics.set_index("name")
    for i, ((case, _), f) in enumerate(zip(specs, scale)):
        rows, cols, s = CASES[case]
        assert_metrics(m.loc[f"m{i}"].to_dict(), closed_form(s * f, rows, cols), NORM_KEYS, rtol=1e-10)
        # the stored spectrum is lambda = s^2 ascending
        np.testing.assert_allclose(res.spectra[f"m{i}"], np.sort((s * f) ** 2), rtol=1e-10, atol=0)


def test_engine_linear_module_orientation():
    """nn.Linear(in, out).weight is (out, in): rows = out, cols = in."""
    rows, cols, s = CASES["wide"]
    lin = torch.nn.Linear(cols, rows, bias=True).double()
    with torch.no_grad():
        lin.weight.copy_(tensor("wide", torch.float64))
    res = spectune.analyze(torch.nn.Sequential(lin), progress=False, device="cpu")
    assert list(res.metrics["name"]) == ["0.weight"]  # the bias is a vector, not analyzed
    row = res.metrics.iloc[0].to_dict()
    assert (row["rows"], row["cols"]) == (rows, cols)
    assert_metrics(row, closed_form(s, rows, cols), NORM_KEYS, rtol=1e-10)


# --- compute.eigenvalues + norm_metrics --------------------------------------------------


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("case", list(CASES))
def test_compute_eigenvalues_then_norm_metrics(case, method):
    rows, cols, s = CASES[case]
    mats = [tensor(case, torch.float64, seed) * f for seed, f in ((0, 1.0), (1, 0.5), (2, 4.0))]
    lam, finite = compute.eigenvalues(mats, torch.device("cpu"), torch.float64, method=method)
    assert finite.all()
    assert lam.shape == (3, min(rows, cols))
    assert lam.dtype == torch.float64
    lam = lam.numpy()
    for i, f in enumerate((1.0, 0.5, 4.0)):
        expected_lam = np.sort((s * f) ** 2)
        assert np.all(np.diff(lam[i]) >= 0), "eigenvalues must be ascending"
        assert np.all(lam[i] >= 0)
        np.testing.assert_allclose(lam[i], expected_lam, rtol=0, atol=1e-12 * expected_lam[-1])
        got = spectral.norm_metrics(lam[i], rows, cols)
        expected = closed_form(s * f, rows, cols)
        if case in FULL_RANK:
            assert_metrics(got, expected, NORM_KEYS, rtol=1e-10)
        else:
            assert_metrics(got, expected, SQUARED_KEYS, rtol=1e-10)
            assert_metrics(got, expected, LINEAR_KEYS, rtol=1e-7)
            assert got["condition_number"] > 1e6
        assert got["numerical_rank"] == closed_form(s, rows, cols)["numerical_rank"]


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["tall", "wide"])
def test_compute_eigenvalues_low_precision_input(case, dtype, method):
    rows, cols, _ = CASES[case]
    w = tensor(case, dtype)
    lam = compute.eigenvalues([w], torch.device("cpu"), torch.float64, method=method)[0][0].numpy()
    ref = np.sort(numpy_svals(w) ** 2)
    np.testing.assert_allclose(lam, ref, rtol=0, atol=1e-12 * ref[-1])


@pytest.mark.parametrize("case", ["tall", "wide"])
def test_gram_sliced_accumulation(case, monkeypatch):
    """Force the Gram to be accumulated over many slices of the long dimension."""
    rows, cols, s = CASES[case]
    mats = [tensor(case, torch.float64, seed) for seed in range(2)]
    monkeypatch.setattr(compute, "SLICE_BYTES", 2 * min(rows, cols) * 8 * 7)  # 7 rows per slice
    assert len(compute._slices(max(rows, cols), min(rows, cols), 2, 8)) > 10
    lam = compute.eigenvalues(mats, torch.device("cpu"), torch.float64, method="gram")[0].numpy()
    for i in range(2):
        np.testing.assert_allclose(lam[i], np.sort(s**2), rtol=0, atol=1e-12 * s.max() ** 2)


def test_unknown_method_rejected():
    with pytest.raises(ValueError):
        compute.eigenvalues([torch.eye(3)], torch.device("cpu"), torch.float64, method="qr")


def test_pairwise_dots_against_numpy(monkeypatch):
    rng = np.random.default_rng(5)
    a = [torch.from_numpy(rng.standard_normal((13, 7))) for _ in range(3)]
    b = [torch.from_numpy(rng.standard_normal((13, 7))) for _ in range(2)]
    monkeypatch.setattr(compute, "SLICE_BYTES", 5 * 8 * 9)  # 9 elements per slice
    got = compute.pairwise_dots(a, b, torch.device("cpu"), torch.float64).numpy()
    ref = np.array([[float((x.numpy() * y.numpy()).sum()) for y in b] for x in a])
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    got_f = compute.pairwise_dots(
        a, b, torch.device("cpu"), torch.float64, f=torch.abs, g=lambda x: x * x
    ).numpy()
    ref_f = np.array([[float((np.abs(x.numpy()) * y.numpy() ** 2).sum()) for y in b] for x in a])
    np.testing.assert_allclose(got_f, ref_f, rtol=1e-12)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_nonfinite_matrices_are_flagged_without_poisoning_the_batch(method):
    good = torch.randn(40, 24, dtype=torch.float64)
    nan = good.clone()
    nan[7, 3] = float("nan")
    inf = good.clone()
    inf[0, 23] = float("inf")
    lam, finite = compute.eigenvalues([good, nan, inf], torch.device("cpu"), torch.float64, method=method)
    assert finite.tolist() == [True, False, False]
    ref = np.sort(np.linalg.svd(good.numpy(), compute_uv=False) ** 2)
    np.testing.assert_allclose(lam[0].numpy(), ref, rtol=1e-10, atol=1e-12 * ref[-1])
    assert torch.isnan(lam[1:]).all()


# --- esd_distance and rand_distance: identities and a hand-built case -------------------------------


def test_esd_distance_identities():
    lam = np.array([0.5, 1.0, 2.0, 7.0, 30.0])
    assert spectral.esd_distance(lam, lam) == 0.0
    assert spectral.esd_distance(lam, lam * 1.0) == 0.0
    # disjoint supports (1-2 against 100-200): the histograms share no bin, Jensen-Shannon distance 1
    assert spectral.esd_distance(np.array([1.0, 1.5, 2.0]), np.array([100.0, 150.0, 200.0])) == pytest.approx(1.0)


def test_esd_distance_hand_built():
    """log10: [0, 1] against [0, 2] on 4 bins of width 0.5 over [0, 2]: p = (1/2, 0, 1/2, 0), q = (1/2, 0, 0, 1/2).

    m = (1/2, 0, 1/4, 1/4); KL(p || m) = KL(q || m) = 1/2 ln-free in bits; JS = 1/2, distance sqrt(1/2).
    """
    d = spectral.esd_distance(np.array([1.0, 10.0]), np.array([1.0, 100.0]), bins=4)
    assert d == pytest.approx(math.sqrt(0.5), rel=1e-12)


def test_rand_distance_is_the_distance_to_the_seeded_shuffle():
    """The engine's rand_distance equals esd_distance to the spectrum of W shuffled by its own generator.

    A rank-one matrix is far from its shuffle (its spectrum is one spike, the shuffle's a
    noise bulk); an i.i.d. Gaussian one is close to it; another seed shuffles differently.
    """
    from spectune.analyze.engine import shuffle_generator

    rng = np.random.default_rng(0)
    mats = {"noise": rng.standard_normal((768, 512)), "rank1": np.outer(rng.standard_normal(768), rng.standard_normal(512))}
    module = torch.nn.ModuleDict({k: torch.nn.Linear(512, 768, bias=False) for k in mats})
    for k, w in mats.items():
        module[k].weight.data = torch.from_numpy(w).float()
    res = spectune.analyze(module, randomize=True, progress=False).metrics.set_index("name")
    for k in mats:
        w = module[k].weight.detach()
        perm = torch.randperm(w.numel(), generator=shuffle_generator(0, f"{k}.weight"))
        shuffled = w.reshape(-1)[perm].reshape(w.shape).double().numpy()
        own = np.linalg.eigvalsh(w.double().numpy().T @ w.double().numpy())
        ref = spectral.esd_distance(np.clip(own, 0, None), np.clip(np.linalg.eigvalsh(shuffled.T @ shuffled), 0, None))
        assert res.loc[f"{k}.weight", "rand_distance"] == pytest.approx(ref, abs=1e-9)
    assert res.loc["rank1.weight", "rand_distance"] > 0.9 > 0.5 > res.loc["noise.weight", "rand_distance"]
    other = spectune.analyze(module, randomize=True, seed=1, progress=False).metrics.set_index("name")
    assert other.loc["noise.weight", "rand_distance"] != res.loc["noise.weight", "rand_distance"]
