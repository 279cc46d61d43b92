"""Seed 001 studies: the math checked exactly on known cases, and one tiny study run end to end."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import FILLER, WORDS, keyword_csv
from spectune.study.landscape import hessian_top_eigenvalue, perturbation_sharpness
from spectune.study.stats import Estimate, ols_coefficient, spearman_interval, t_interval, verdict
from spectune.study.trajectories import lr_share
from spectune.study.transform import (
    factor_for_top_ratio,
    rescale_top_singular_values,
    rescaled_spectrum,
    stable_rank,
    top_eig_ratio,
)

# --- transform -----------------------------------------------------------------------------------


def _matrix(m: int = 24, n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("factor,k", [(2.0, 1), (3.0, 2), (0.9, 1), (1.5, 4)])
def test_rescale_matches_closed_form(factor: float, k: int) -> None:
    w = _matrix()
    s = torch.linalg.svdvals(w)
    new = rescale_top_singular_values(w, factor, k)
    s_new = torch.linalg.svdvals(new)
    # Frobenius norm unchanged
    assert torch.linalg.matrix_norm(new).item() == pytest.approx(torch.linalg.matrix_norm(w).item(), rel=1e-12)
    # the new spectrum is the closed form: s_i * c (i > k), s_i * f * c (i <= k), c = ||s|| / ||s'||
    sq = s**2
    c = math.sqrt(float(sq.sum()) / (factor**2 * float(sq[:k].sum()) + float(sq[k:].sum())))
    expected = s.clone()
    expected[:k] *= factor
    expected *= c
    torch.testing.assert_close(s_new, torch.sort(expected, descending=True).values, rtol=1e-10, atol=1e-10)
    # the top eigenvalue ratio asked for (k = 1: f^2 s1^2 / (f^2 s1^2 + sum_{i>1} s_i^2)) when s1 stays on top
    if k == 1 and factor >= 1:
        want = factor**2 * float(sq[0]) / (factor**2 * float(sq[0]) + float(sq[1:].sum()))
        assert top_eig_ratio(s_new) == pytest.approx(want, rel=1e-10)
        assert stable_rank(s_new) == pytest.approx(1 / want, rel=1e-10)
    # singular vectors kept: the right singular subspace of the top-k is the same
    _, _, vh0 = torch.linalg.svd(w)
    _, _, vh1 = torch.linalg.svd(new)
    if factor > 1:
        proj = vh1[:k] @ vh0[:k].T
        assert torch.linalg.matrix_norm(proj).item() == pytest.approx(math.sqrt(k), rel=1e-8)


def test_factor_for_target_ratio_hits_target() -> None:
    w = _matrix(32, 32, seed=1)
    s = torch.linalg.svdvals(w)
    target = 0.4
    new = rescale_top_singular_values(w, factor_for_top_ratio(s, target))
    assert top_eig_ratio(torch.linalg.svdvals(new)) == pytest.approx(target, rel=1e-9)


def test_rescale_identity_and_errors() -> None:
    w = _matrix().float()
    assert torch.equal(rescale_top_singular_values(w, 1.0), w)
    assert rescale_top_singular_values(w, 2.0).dtype == torch.float32
    with pytest.raises(ValueError):
        rescaled_spectrum(torch.ones(3), 0.0)
    with pytest.raises(ValueError):
        rescale_top_singular_values(torch.ones(3), 2.0)


# --- landscape -----------------------------------------------------------------------------------


class _Linear(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())


def _mse(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((x @ model.w - y) ** 2).mean()


def test_power_iteration_matches_explicit_hessian() -> None:
    """Least squares: loss = mean over batches of mean((XW - Y)^2); its Hessian is exact and constant."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, generator=g, dtype=torch.float64)
    batches = [(torch.randn(10, 6, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 6, dtype=torch.float64),
                torch.randn(10, 2, generator=g, dtype=torch.float64)) for _ in range(3)]
    model = _Linear(w)

    def flat_loss(v: torch.Tensor) -> torch.Tensor:
        m = v.reshape(6, 2)
        return sum(((x @ m - y) ** 2).mean() for x, y in batches) / len(batches)

    hess = torch.autograd.functional.hessian(flat_loss, w.reshape(-1))
    exact = torch.linalg.eigvalsh(hess)
    got = hessian_top_eigenvalue(model, batches, _mse, iters=500, tol=1e-12)
    assert got["eigenvalue"] == pytest.approx(float(exact.abs().max()), rel=1e-6)
    assert torch.equal(model.w.detach(), w)  # weights untouched


def test_power_iteration_on_nonquadratic_mlp() -> None:
    """A tiny tanh network: compare with the explicit Hessian from torch.func (dominant |eigenvalue|)."""
    from torch.func import functional_call, hessian

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    names = ["0.weight", "2.weight"]
    params = {n: p.detach() for n, p in net.named_parameters()}
    shapes = [params[n].shape for n in names]

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return ((functional_call(net, {**params, **parts}, (x,)) - y) ** 2).mean()

    flat = torch.cat([params[n].reshape(-1) for n in names])
    ev = torch.linalg.eigvalsh(hessian(f)(flat))
    dominant = float(ev[ev.abs().argmax()])
    got = hessian_top_eigenvalue(net, [(x, y)], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), params=names,
                                 iters=2000, tol=1e-13)
    assert got["eigenvalue"] == pytest.approx(dominant, rel=1e-5)


def test_perturbation_sharpness_on_quadratic() -> None:
    """L(W) = c/2 ||W - W0||^2 at W = W0: every draw of relative size r raises it by c/2 r^2 ||W0||^2 exactly."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    model = _Linear(w0)
    c, r = 3.0, 0.05
    out = perturbation_sharpness(model, [None], lambda m, _b: c / 2 * ((m.w - w0) ** 2).sum(), rel_size=r, draws=4)
    want = c / 2 * r**2 * float((w0**2).sum())
    assert out["base_loss"] == pytest.approx(0.0, abs=1e-15)
    assert all(v == pytest.approx(want, rel=1e-9) for v in out["increases"])
    assert torch.equal(model.w.detach(), w0)


def test_perturbation_sharpness_anisotropic_expectation() -> None:
    """L = 1/2 d^T A d with random directions: E[increase] = 1/2 r^2 ||W||^2 tr(A) / n (uniform on the sphere)."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, 1, generator=g, dtype=torch.float64)
    a = torch.diag(torch.tensor([1.0, 2, 3, 4, 5, 30], dtype=torch.float64))
    model = _Linear(w0)
    r = 0.1
    out = perturbation_sharpness(model, [None], lambda m, _b: 0.5 * ((m.w - w0).T @ a @ (m.w - w0)).sum(), rel_size=r,
                                 draws=4000, seed=3)
    want = 0.5 * r**2 * float((w0**2).sum()) * float(a.trace()) / 6
    assert out["mean_increase"] == pytest.approx(want, rel=0.06)


# --- statistics and the claim rule ---------------------------------------------------------------


def test_t_interval_closed_form() -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    e = t_interval(x)
    half = 3.182446305284263 * np.std(x, ddof=1) / 2  # t_{0.975, 3}
    assert (e.value, e.lo, e.hi, e.n) == pytest.approx((2.5, 2.5 - half, 2.5 + half, 4))
    assert math.isnan(t_interval([1.0]).lo)


def test_spearman_fisher_interval() -> None:
    x = np.arange(10.0)
    e = spearman_interval(x, x**3)
    assert e.value == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    e = spearman_interval(a, b)
    z, se = math.atanh(e.value), math.sqrt(1.06 / 27)
    assert (e.lo, e.hi) == pytest.approx((math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)), rel=1e-5)
    assert math.isnan(spearman_interval([1, 2, 3], [3, 2, 1]).lo)  # n < 4: no interval


@pytest.mark.parametrize("lo,hi,direction,want", [
    (0.1, 0.5, "positive", "supported"), (-0.5, -0.1, "positive", "not supported"), (-0.1, 0.5, "positive", "inconclusive"),
    (-0.5, -0.1, "negative", "supported"), (0.1, 0.5, "negative", "not supported"),
    (0.1, 0.5, "nonzero", "supported"), (-0.5, -0.1, "nonzero", "supported"), (-0.1, 0.1, "nonzero", "inconclusive"),
    (float("nan"), float("nan"), "positive", "inconclusive"),
])
def test_claim_rule(lo: float, hi: float, direction: str, want: str) -> None:
    assert verdict(Estimate(0.0, lo, hi, 10, "t"), direction) == want  # type: ignore[arg-type]


def test_ols_coefficient_matches_linregress() -> None:
    from scipy import stats

    rng = np.random.default_rng(0)
    x = np.repeat([-1.0, 0.0, 1.0], 3)
    y = 0.5 - 0.2 * x + rng.normal(scale=0.1, size=x.size)
    e = ols_coefficient(np.column_stack([np.ones_like(x), x]), y, 1)
    ref = stats.linregress(x, y)
    half = stats.t.ppf(0.975, x.size - 2) * ref.stderr
    assert (e.value, e.lo, e.hi) == pytest.approx((ref.slope, ref.slope - half, ref.slope + half), rel=1e-10)
    # an exact quadratic: the curvature is recovered, and with no residual the interval is a point
    q = ols_coefficient(np.column_stack([np.ones_like(x), x, x**2]), 1 - 2 * x**2, 2)
    assert q.value == pytest.approx(-2) and q.hi - q.lo == pytest.approx(0, abs=1e-9)


def test_claim_rule_with_null() -> None:
    assert verdict(Estimate(0.7, 0.6, 0.8, 5, "t"), "positive", null=5 / 9) == "supported"
    assert verdict(Estimate(0.5, 0.4, 0.52, 5, "t"), "positive", null=5 / 9) == "not supported"


def test_lr_share() -> None:
    assert lr_share("linear", 0.0, 1 / 3) == pytest.approx(5 / 9, abs=1e-6)
    assert lr_share("constant", 0.0, 0.25) == pytest.approx(0.25, abs=1e-6)
    assert lr_share("cosine", 0.0, 0.5) == pytest.approx(0.5 + 1 / math.pi, abs=1e-6)  # 2 * (1/4 + 1/(2 pi))


# --- config --------------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from spectune.study import load_study_config
    from spectune.train.config import TrainConfigError

    good = {"grid": {"tasks": {"t": {"data": {"name": "trec"}}}, "methods": {"full": {"method": {"kind": "full"}}}}}
    with pytest.raises(TrainConfigError, match=r"controled"):
        load_study_config({**good, "controled": {}})
    with pytest.raises(TrainConfigError, match=r"landscape\.rel_size"):
        load_study_config({**good, "landscape": {"rel_size": -1}})
    with pytest.raises(TrainConfigError, match=r"controlled\.arms"):
        load_study_config({**good, "controlled": {"arms": {"x": ["attn_z"]}}})
    with pytest.raises(TrainConfigError, match=r"(?s)grid.*metod"):
        load_study_config({**good, "grid": {**good["grid"], "methods": {"full": {"metod": {}}}}})


def test_example_configs_validate() -> None:
    from spectune.study import load_study_config

    examples = sorted(Path(__file__).parents[1].joinpath("examples", "study").glob("*.yaml"))
    assert examples
    for p in examples:
        load_study_config(p)


# --- a tiny study, end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny BERT with a 60-word WordPiece vocabulary (a small embedding keeps tracking cheap) and a 3-class CSV."""
    import transformers as tf

    root = tmp_path_factory.mktemp("study-assets")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *" ".join(WORDS.values()).split(), *FILLER,
             *[str(d) for d in range(10)], *[f"##{d}" for d in range(10)]]
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tf.BertTokenizerFast(vocab_file=str(root / "bert" / "vocab.txt")).save_pretrained(root / "bert")
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    keyword_csv(root / "cls.csv", 96)
    return root


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a second busy-waiting
    OpenMP thread makes them several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_study_all_writes_report(tiny_assets: Path, tmp_path: Path, one_thread: None) -> None:
    from spectune.study import run_study

    cfg = {
        "name": "tiny",
        "grid": {
            "base": {"model": {"name": str(tiny_assets / "bert"), "max_length": 16},
                     "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3},
                     "eval": {"every": "no", "batch_size": 64}, "logging": {"every_steps": 50}},
            "tasks": {"toy": {"data": {"path": str(tiny_assets / "cls.csv")}}},
            "methods": {"full": {"method": {"kind": "full"}},
                        "lora": {"method": {"kind": "lora", "r": 4}, "train": {"lr": 5e-3}}},
            "seeds": [0, 1],
        },
        "track_every_steps": 2,
        "controlled": {"arms": {"attention": ["attn_q", "attn_k", "attn_v", "attn_o"]}, "doses": [0.5, 1.0, 2.0],
                       "seeds": [0]},
        "landscape": {"batches": 2, "batch_size": 8, "power_iters": 5, "draws": 2},
    }
    path = run_study("all", cfg, out_dir=tmp_path / "study", progress=False)
    out = path.parent
    assert path.name == "report.html" and path.exists()
    text = path.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) >= 8
    for b64 in imgs:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    claims = pd.read_csv(out / "claims.csv")
    assert set(claims["verdict"]) <= {"supported", "not supported", "inconclusive", "not evaluated"}
    assert {"1a", "2", "4", "5", "7", "8", "A1"} <= set(claims["id"])
    assert (out / "claims.md").read_text().startswith("# Claims")
    # every claim of a study that ran was evaluated (one arm: claim 4 needs two and says so)
    evaluated = claims[claims["id"] != "4"]
    assert (evaluated["verdict"] != "not evaluated").all(), evaluated[["id", "note"]].to_string()
    for name in ("trajectory", "matrix_changes", "movement", "landscape", "dose_response", "controlled_results"):
        assert (out / "tables" / f"{name}.parquet").exists() and (out / "tables" / f"{name}.csv").exists()
    traj = pd.read_parquet(out / "tables" / "trajectory.parquet")
    assert {"stable_rank", "top_eig_ratio", "alpha_hill"} <= set(traj.columns)
    assert traj.groupby(["method", "seed"])["step"].nunique().min() >= 4  # every 2 steps over 2 epochs of 6 steps
    dose = pd.read_parquet(out / "tables" / "dose_response.parquet")
    assert list(dose["dose"]) == [0.5, 1.0, 2.0]
    sr = dose.set_index("dose")["stable_rank_after"]
    assert sr[0.5] > sr[1.0] > sr[2.0]  # the dose changed the ratio the way it says
    log = pd.read_parquet(out / "tables" / "transform_log.parquet")
    assert np.allclose(log["fro_before"], log["fro_after"], rtol=1e-5)
    land = pd.read_parquet(out / "tables" / "landscape.parquet")
    assert land["hessian_top"].notna().all() and land["sharpness"].notna().all()

    # a second run reuses every cell and cached measurement: nothing in a cell folder is written again, or added
    def stamps() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "grid" / "cells").rglob("*") if p.is_file()}

    before = stamps()
    for name in ("summary.json", "study_movement.parquet"):  # 2 methods x 2 seeds
        assert sum(p.name == name for p in before) == 4, name
    run_study("layerwise", cfg, out_dir=tmp_path / "study", progress=False)
    assert stamps() == before


def test_changed_transform_settings_train_new_cells(tiny_assets: Path, tmp_path: Path, one_thread: None) -> None:
    """Issue 12: another top_k or layers must not pair its doses with the cells of the old transform."""
    import json

    import yaml

    from spectune.study import load_study_config, run_study
    from spectune.study.controlled import build

    cfg = {
        "name": "tiny",
        "grid": {"base": {"model": {"name": str(tiny_assets / "bert"), "max_length": 16},
                          "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}, "eval": {"every": "no", "batch_size": 64}},
                 "tasks": {"toy": {"data": {"path": str(tiny_assets / "cls.csv")}}},
                 "methods": {"full": {"method": {"kind": "full"}}}, "seeds": [0]},
        "controlled": {"arms": {"attention": ["attn_q", "attn_k", "attn_v", "attn_o"]}, "doses": [1.0, 4.0], "seeds": [0]},
    }
    root = tmp_path / "study"
    trained: dict[int, set[str]] = {}
    for k in (1, 3, 1):
        cfg["controlled"]["top_k"] = k
        run_study("controlled", cfg, out_dir=root, progress=False)
        ccfg, log = build(load_study_config(cfg), root)
        cells = list(Path(ccfg.output_dir).glob("cells/toy/*/seed-0"))
        assert len(cells) == 2
        for cell in cells:  # every score comes from a cell trained on this setting's transformed model
            model = yaml.safe_load((cell / "config.yaml").read_text())["model"]["name"]
            settings = json.loads((Path(model) / "spectune_transform.json").read_text())
            assert settings["top_k"] == k
        stamps = {str(c): (c / "summary.json").stat().st_mtime_ns for c in cells}
        if k in trained:
            assert stamps == trained[k]  # switching back reuses the cells of that setting, untouched
        trained[k] = stamps
    assert not set(trained[1]) & set(trained[3])


def test_arm_names_cannot_leave_the_study_folder() -> None:
    from spectune.study import load_study_config
    from spectune.train.config import TrainConfigError

    good = {"grid": {"tasks": {"t": {"data": {"name": "trec"}}}, "methods": {"full": {"method": {"kind": "full"}}}}}
    for bad in ("../../../x", "a/b", ".hidden", "control"):
        with pytest.raises(TrainConfigError, match="arm name"):
            load_study_config({**good, "controlled": {"arms": {bad: ["attn_q"]}}})
