"""Bad input gets a clear message or a status row; never a crash of the whole run or a wrong number."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import spectune
from spectune.analyze import SourceError


class Holder(torch.nn.Module):
    """A module holding arbitrary named matrices (what a corrupt checkpoint might contain)."""

    def __init__(self, **mats: torch.Tensor) -> None:
        super().__init__()
        for k, v in mats.items():
            self.register_parameter(k, torch.nn.Parameter(v, requires_grad=False))


def _rows(model):  # type: ignore[no-untyped-def]
    return spectune.analyze(model, progress=False).metrics.set_index("name")


def test_missing_path_names_the_path_and_the_aliases():
    with pytest.raises(SourceError, match=r"model not found: '/nonexistent/model'.*minilm"):
        spectune.analyze("/nonexistent/model", progress=False)


def test_truncated_safetensors_file(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cannot read safetensors file .*model\.safetensors"):
        spectune.analyze(path, progress=False)


def test_garbage_safetensors_header(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SourceError, match="truncated or corrupt"):
        spectune.analyze(path, progress=False)


def test_index_naming_a_missing_shard(tmp_path):  # type: ignore[no-untyped-def]
    save_file({"a.weight": torch.randn(16, 16)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"missing file\(s\): model-00002-of-00002\.safetensors"):
        spectune.analyze(tmp_path, progress=False)


def test_malformed_config(tmp_path):  # type: ignore[no-untyped-def]
    save_file({"a.weight": torch.randn(16, 16)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{ broken")
    with pytest.raises(SourceError, match="malformed config.json"):
        spectune.analyze(tmp_path, progress=False)


def test_pickled_checkpoints_are_refused(tmp_path):  # type: ignore[no-untyped-def]
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SourceError, match="pickled pytorch_model.bin"):
        spectune.analyze(tmp_path, progress=False)
    with pytest.raises(SourceError, match="not loaded"):
        spectune.analyze(tmp_path / "pytorch_model.bin", progress=False)


def test_bad_matrices_get_status_rows_and_good_ones_still_computed():
    good = torch.randn(48, 32)
    good2 = good + torch.randn(48, 32)
    nan = torch.randn(48, 32)
    nan[3, 4] = float("nan")
    inf = torch.randn(48, 32)
    inf[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="nonfinite"):
        m = _rows(Holder(good=good, good2=good2, nan=nan, inf=inf, zero=torch.zeros(48, 32), one=torch.ones(1, 1) * 3, tiny=torch.randn(2, 3)))
    assert m.loc["good", "status"] == "ok"
    assert m.loc["good", "stable_rank"] == pytest.approx(
        float((torch.linalg.svdvals(good.double()) ** 2).sum() / torch.linalg.svdvals(good.double())[0] ** 2)
    )
    assert m.loc["nan", "status"] == "nonfinite" and "1 NaN/Inf" in m.loc["nan", "note"]
    assert m.loc["inf", "status"] == "nonfinite"
    assert math.isnan(m.loc["nan", "stable_rank"]) and math.isnan(m.loc["nan", "cs_metric"])
    assert m.loc["zero", "status"] == "zero" and m.loc["zero", "frobenius_norm"] == 0
    assert math.isnan(m.loc["zero", "stable_rank"])
    # tiny matrices: exact norms, no fits
    assert m.loc["one", "status"] == "too_small"
    assert m.loc["one", "spectral_norm"] == pytest.approx(3.0)
    assert m.loc["one", "stable_rank"] == pytest.approx(1.0)
    assert math.isnan(m.loc["one", "alpha"])
    assert m.loc["tiny", "status"] == "too_small"
    # bad same-shape neighbours are left out of the cosine similarity instead of poisoning it
    a, b = good.double().flatten(), good2.double().flatten()
    expected = float(a @ b / (a.norm() * b.norm()))
    assert m.loc["good", "cs_metric"] == pytest.approx(expected, rel=1e-9)
    assert m.loc["good2", "cs_metric"] == pytest.approx(expected, rel=1e-9)


def test_quantized_integer_weights_are_reported_not_measured(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "layers.0.q_proj.weight": torch.randint(-128, 127, (64, 32), dtype=torch.int8),
            "layers.0.q_proj.weight_scale": torch.ones(64),
            "layers.0.k_proj.weight": torch.randn(64, 32),
            "position_ids": torch.arange(64).reshape(1, 64),
        },
        str(path),
    )
    m = _rows(path)
    assert m.loc["layers.0.q_proj.weight", "status"] == "quantized"
    assert "I8" in m.loc["layers.0.q_proj.weight", "note"]
    assert math.isnan(m.loc["layers.0.q_proj.weight", "stable_rank"])
    assert m.loc["layers.0.k_proj.weight", "status"] == "ok"
    assert "position_ids" not in m.index  # integer buffers are not weights


def test_one_unreadable_tensor_does_not_sink_the_run():
    from spectune.analyze.sources import WeightRef, WeightSource
    from spectune.analyze.engine import _Run
    from spectune.analyze import AnalysisConfig

    def boom() -> torch.Tensor:
        raise OSError("disk read failed")

    refs = [
        WeightRef("a.weight", (32, 16), "F32", lambda: torch.randn(32, 16)),
        WeightRef("b.weight", (32, 16), "F32", boom),
    ]
    with pytest.warns(UserWarning, match="unreadable"):
        res = _Run(WeightSource("test", refs), AnalysisConfig(progress=False)).run()
    m = res.metrics.set_index("name")
    assert m.loc["a.weight", "status"] == "ok"
    assert m.loc["b.weight", "status"] == "unreadable" and "disk read failed" in m.loc["b.weight", "note"]


def test_nothing_left_after_filters_is_an_error():
    with pytest.raises(ValueError, match="no weight matrices .* filters"):
        spectune.analyze(Holder(a=torch.randn(8, 8)), include=["nomatch"], progress=False)


def test_unknown_option_is_rejected():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ce_mod"):
        spectune.analyze(Holder(a=torch.randn(8, 8)), ce_mod="histogram", progress=False)
