"""Cross-layer metrics (cs_metric, ce_metric) through spectune.analyze, against numpy.

References are written here from the definitions:
- cs_metric: mean cosine similarity of the flattened matrix with every OTHER matrix of
  the same shape;
- ce_metric, 'histogram' mode: p = histogram of w / rms(w) clamped to [-8, 8], 256 equal
  bins on [-8, 8], normalised; H(p_l, p_i) = -sum p_l log(p_i + 1e-10); mean over every
  other analysed matrix, whatever its shape;
- ce_metric, 'elementwise' mode (the seed's literal reading): p = |w| / sum |w| over
  element positions, same H, mean over other matrices of the same shape only.

Tolerances: relative 1e-10 against the references (float64 arithmetic on float32
weights); chunked vs unchunked runs relative 1e-12 (same sums, possibly blocked
differently by BLAS).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import spectune

EPS = 1e-10


class Holder(torch.nn.Module):
    def __init__(self, mats):
        super().__init__()
        for i, m in enumerate(mats):
            self.register_parameter(f"m{i}", torch.nn.Parameter(torch.as_tensor(m), requires_grad=False))


def run(mats, **opts):
    res = spectune.analyze(Holder(mats), progress=False, device="cpu", **opts)
    return res.metrics.set_index("name")


# --- numpy references --------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cs_reference(mats: list[np.ndarray]) -> list[float]:
    out = []
    for i, a in enumerate(mats):
        same = [cosine(a, b) for j, b in enumerate(mats) if j != i and b.shape == a.shape]
        out.append(float(np.mean(same)) if same else math.nan)
    return out


def value_hist(w: np.ndarray, bins: int = 256, rng: float = 8.0) -> np.ndarray:
    x = w.astype(np.float64).ravel()
    z = np.clip(x / np.sqrt(np.mean(x * x)), -rng, rng)
    h, _ = np.histogram(z, bins=bins, range=(-rng, rng))
    return h / h.sum()


def xent(p: np.ndarray, q: np.ndarray) -> float:
    return float(-np.sum(p * np.log(q + EPS)))


def ce_histogram_reference(mats: list[np.ndarray]) -> list[float]:
    hs = [value_hist(m) for m in mats]
    return [float(np.mean([xent(hs[i], hs[j]) for j in range(len(mats)) if j != i])) for i in range(len(mats))]


def ce_elementwise_reference(mats: list[np.ndarray]) -> list[float]:
    ps = [np.abs(m.astype(np.float64)).ravel() / np.abs(m.astype(np.float64)).sum() for m in mats]
    out = []
    for i, a in enumerate(mats):
        same = [xent(ps[i], ps[j]) for j, b in enumerate(mats) if j != i and b.shape == a.shape]
        out.append(float(np.mean(same)) if same else math.nan)
    return out


# --- the model ------------------------------------------------------------------------------


def orthogonal_to(vectors: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A random vector orthogonal to every given vector (Gram-Schmidt against their span)."""
    q, _ = np.linalg.qr(np.stack(vectors, axis=1))
    v = rng.standard_normal(q.shape[0])
    v -= q @ (q.T @ v)
    v -= q @ (q.T @ v)
    return v


def make_mats(seed: int = 0) -> list[np.ndarray]:
    """Five 40 x 24 matrices (two identical, one orthogonal to the rest, one correlated),
    plus matrices of two other shapes; float32, with heavy-ish tails so the histogram edges fill."""
    rng = np.random.default_rng(seed)
    shape = (40, 24)
    a = rng.standard_normal(shape)
    b = rng.standard_t(df=3, size=shape)
    c = 0.6 * a + 0.4 * rng.standard_normal(shape)
    same = [a, a.copy(), b, c]
    d = orthogonal_to([m.ravel() for m in same], rng).reshape(shape) * 0.1
    same.append(d)
    others = [rng.laplace(size=(24, 40)), rng.standard_normal((32, 32)) * 3.0, rng.standard_t(df=4, size=(32, 32))]
    return [m.astype(np.float32) for m in same + others]


MATS = make_mats()


def test_reference_sanity():
    # two identical matrices and one orthogonal to all other same-shape ones
    assert cosine(MATS[0], MATS[1]) == pytest.approx(1.0, abs=1e-12)
    for j in range(4):
        assert abs(cosine(MATS[4], MATS[j])) < 1e-6  # float32 storage of an exactly orthogonal vector


def test_cs_metric_matches_numpy():
    m = run(MATS)
    ref = cs_reference(MATS)
    got = [m.loc[f"m{i}", "cs_metric"] for i in range(len(MATS))]
    for i in range(5):
        assert got[i] == pytest.approx(ref[i], rel=1e-10, abs=1e-12), i
    # the orthogonal matrix's cs is ~0, the identical pair shares one term of 1
    assert abs(got[4]) < 1e-6
    # (24, 40) is alone in its shape: no partner, NaN; the two (32, 32) see only each other
    assert math.isnan(got[5])
    assert got[6] == pytest.approx(cosine(MATS[6], MATS[7]), rel=1e-10)
    assert got[7] == pytest.approx(cosine(MATS[6], MATS[7]), rel=1e-10)


def test_ce_histogram_matches_numpy():
    m = run(MATS)  # ce_mode='histogram' is the default
    ref = ce_histogram_reference(MATS)
    for i in range(len(MATS)):
        assert m.loc[f"m{i}", "ce_metric"] == pytest.approx(ref[i], rel=1e-10), i


def test_ce_histogram_is_scale_invariant_and_self_entropy():
    # a rescaled copy has the same histogram, so H(p, q) = H(p) for that pair
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 20)).astype(np.float32)
    mats = [a, (a * 7.5).astype(np.float32)]
    m = run(mats)
    p = value_hist(a)
    h_self = -float(np.sum(p * np.log(p + EPS)))
    assert m.loc["m0", "ce_metric"] == pytest.approx(h_self, rel=1e-10)
    assert m.loc["m1", "ce_metric"] == pytest.approx(h_self, rel=1e-10)


@pytest.mark.parametrize("bins", [16, 100])
def test_ce_histogram_bins_option(bins):
    m = run(MATS, ce_bins=bins)
    hs = [value_hist(x, bins=bins) for x in MATS]
    for i in range(len(MATS)):
        ref = np.mean([xent(hs[i], hs[j]) for j in range(len(MATS)) if j != i])
        assert m.loc[f"m{i}", "ce_metric"] == pytest.approx(ref, rel=1e-10)


def test_ce_elementwise_matches_seed_definition():
    m = run(MATS, ce_mode="elementwise")
    ref = ce_elementwise_reference(MATS)
    for i in range(len(MATS)):
        got = m.loc[f"m{i}", "ce_metric"]
        if math.isnan(ref[i]):
            assert math.isnan(got), i
        else:
            assert got == pytest.approx(ref[i], rel=1e-10), i
    # identical matrices: H(p, p) is the entropy of p
    p = np.abs(MATS[0].astype(np.float64)).ravel()
    p /= p.sum()
    h00 = xent(p, p)
    assert h00 == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)


# --- chunking --------------------------------------------------------------------------------


def chunk_mats() -> list[np.ndarray]:
    """Five 96 x 1024 float32 matrices (393,216 bytes each): batch_bytes = 2**20 holds two,
    so the group is read as chunks of 2, 2, 1; plus one matrix of another shape."""
    rng = np.random.default_rng(7)
    shape = (96, 1024)
    base = rng.standard_normal(shape)
    mats = [0.5 * base + rng.standard_normal(shape) * (k + 1) * 0.3 for k in range(5)]
    mats.append(rng.standard_normal((64, 1024)))
    return [m.astype(np.float32) for m in mats]


def test_chunked_spectra_equal_unchunked():
    mats = chunk_mats()
    assert 2**20 // (96 * 1024 * 4) == 2  # the engine's chunk size for this group
    small = run(mats, batch_bytes=2**20)
    big = run(mats)
    for name in small.index:
        assert small.loc[name, "status"] == big.loc[name, "status"] == "ok"
        for col in ("frobenius_norm", "stable_rank", "spectral_entropy", "alpha", "alpha_hill", "snr"):
            assert small.loc[name, col] == pytest.approx(big.loc[name, col], rel=1e-12), (name, col)


@pytest.mark.parametrize("ce_mode", ["histogram", "elementwise"])
def test_chunked_crosslayer_equals_unchunked(ce_mode):
    mats = chunk_mats()
    small = run(mats, batch_bytes=2**20, ce_mode=ce_mode)
    big = run(mats, ce_mode=ce_mode)
    cs = cs_reference(mats)
    ce = (ce_histogram_reference if ce_mode == "histogram" else ce_elementwise_reference)(mats)
    for i in range(5):
        # the unchunked run is right ...
        assert big.loc[f"m{i}", "cs_metric"] == pytest.approx(cs[i], rel=1e-10)
        assert big.loc[f"m{i}", "ce_metric"] == pytest.approx(ce[i], rel=1e-10)
    for i in range(5):
        # ... and chunking must not change anything (m0: expected 0.38984007566, got 0.54784585175)
        assert small.loc[f"m{i}", "cs_metric"] == pytest.approx(big.loc[f"m{i}", "cs_metric"], rel=1e-12), i
        assert small.loc[f"m{i}", "ce_metric"] == pytest.approx(big.loc[f"m{i}", "ce_metric"], rel=1e-12), i
    assert math.isnan(small.loc["m5", "cs_metric"])  # alone in its shape


# --- a matrix that is skipped must not poison its group ---------------------------------------------


@pytest.mark.parametrize("bad", ["zero", "nonfinite"])
@pytest.mark.parametrize("ce_mode", ["histogram", "elementwise"])
def test_skipped_matrix_does_not_poison_group(ce_mode, bad):
    rng = np.random.default_rng(1)
    mats = [rng.standard_normal((20, 30)).astype(np.float32) for _ in range(3)]
    if bad == "zero":
        mats[2][:] = 0.0
    else:
        mats[2][3, 4] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = run(mats, ce_mode=ce_mode)
    assert m.loc["m2", "status"] == bad
    assert math.isnan(m.loc["m2", "cs_metric"])
    good = mats[:2]
    assert m.loc["m0", "cs_metric"] == pytest.approx(cosine(good[0], good[1]), rel=1e-10)
    assert m.loc["m1", "cs_metric"] == pytest.approx(cosine(good[0], good[1]), rel=1e-10)
    ref = (ce_elementwise_reference if ce_mode == "elementwise" else ce_histogram_reference)(good)
    assert m.loc["m0", "ce_metric"] == pytest.approx(ref[0], rel=1e-10)
    assert m.loc["m1", "ce_metric"] == pytest.approx(ref[1], rel=1e-10)
