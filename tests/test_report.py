"""The HTML report: self-contained, every image decodes, bad matrices shown, ESD count per mode."""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

import spectune
from spectune._html import fmt
from spectune.analyze import report
from spectune.analyze.result import AnalysisResult

N_LAYERS = 4
ZEROED = "layers.1.q_proj.weight"


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)


class _Tiny(nn.Module):
    """Names follow the Llama convention so module types and block indices are parsed."""

    def __init__(self, d: int = 32, vocab: int = 64) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(N_LAYERS))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.score = nn.Linear(d, 4, bias=False)  # 4 eigenvalues < min_evals: too_small


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        model.get_parameter(ZEROED).zero_()
    return spectune.analyze(model, progress=False, device="cpu")


def _images(text: str, kind: str) -> list[np.ndarray]:
    uris = re.findall(rf'<img class="{kind}"[^>]*\bsrc="([^"]+)"', text)
    images = []
    for uri in uris:
        assert uri.startswith("data:image/png;base64,")
        img = matplotlib.image.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)), format="png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        images.append(img)
    return images


def test_fixture_has_bad_matrices(result: AnalysisResult) -> None:
    status = dict(zip(result.metrics["name"], result.metrics["status"]))
    assert status[ZEROED] == "zero"
    assert status["score.weight"] == "too_small"


# q_proj blocks with spectra 0,2,3 and down_proj 0..3: first/middle/last of each,
# plus embed_tokens, lm_head and score outside the blocks
EXPECTED_ESD = {"summary": 3 + 3 + 3, "all": 2 * N_LAYERS - 1 + 3, "none": 0}


def test_report_modes(result: AnalysisResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One folder, three runs: each report stands alone and plots/ holds only the latest run's plots."""
    for mode in ("summary", "all", "none"):
        _check_report(result, tmp_path, mode)
        # depth plots are the same in every mode: draw them in full once, then keep the runs quick
        monkeypatch.setattr(report, "KEY_METRICS", ["stable_rank", "alpha"])
    assert not list(tmp_path.rglob("*.tmp"))


def _check_report(result: AnalysisResult, out: Path, mode: str) -> None:
    path = report.write_report(result, out, esd=mode)  # type: ignore[arg-type]
    assert path == out / "report.html" and path.exists()
    text = path.read_text(encoding="utf-8")

    # nothing fetched from anywhere: no remote src/href, no scripts, no stylesheets
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    imgs = re.findall(r"<img\b[^>]*>", text)
    assert imgs and all('src="data:image/png;base64,' in tag for tag in imgs)

    esd = _images(text, "esd")
    depth = _images(text, "depth")
    assert len(esd) == EXPECTED_ESD[mode] == len(list((out / "plots").glob("esd_*.png")))
    assert len(esd) + len(depth) == len(imgs)
    assert 1 <= len(depth) == len(list((out / "plots").glob("depth_*.png")))

    # every non-ok matrix is listed, flagged, with its status and note
    bad_rows = re.findall(r'<tr class="bad">(.*?)</tr>', text)
    for name, status in [(ZEROED, "zero"), ("score.weight", "too_small")]:
        cells = [re.findall(r"<td>(.*?)</td>", row) for row in bad_rows if f"<td>{name}</td>" in row]
        assert len(cells) == 2  # status list and the full table
        assert all(status in c for c in cells)
    assert "all weights are zero" in text
    assert "<td>ok</td>" in text  # the full table lists good matrices too


def test_bad_mode_writes_nothing(result: AnalysisResult, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="esd must be"):
        report.write_report(result, tmp_path, esd="some")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_summary_cap(result: AnalysisResult, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "MAX_SUMMARY_ESD", 4)
    names = report.esd_names(result, "summary")
    assert len(names) == 4
    # the per-type block picks come first, so every module type in the blocks keeps a plot
    types = set(result.metrics.set_index("name").loc[names, "module_type"])
    assert {"attn_q", "ffn_down"} <= types


def test_plot_esd_without_fits(tmp_path: Path) -> None:
    lam = np.sort(np.random.default_rng(0).chisquare(3, size=50))
    row = {"alpha": math.nan, "alpha_xmin": math.nan, "mp_bulk_max": math.nan, "alpha_hill": None, "status": "ok"}
    path = report.plot_esd("w", lam, row, tmp_path / "esd.png")
    assert matplotlib.image.imread(path).shape[0] > 50


def test_number_format() -> None:
    assert fmt(3.14159265) == "3.142"
    assert fmt(123456.7) == "1.235e+05"
    assert fmt(np.int64(22682112)) == "22682112"
    assert fmt(math.nan) == "" and fmt(None) == ""
