"""Weight sources agree with each other, stream files, orient and classify matrices correctly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import spectune
from spectune.analyze.naming import layer_index, module_type
from spectune.analyze.sources import open_source

NUMERIC = ["frobenius_norm", "spectral_norm", "stable_rank", "alpha_hill", "alpha", "num_spikes", "cs_metric"]


def _metrics(src) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    return spectune.analyze(src, progress=False).metrics.set_index("name")


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2", "gemma", "gpt2"])
def test_module_and_folder_give_the_same_metrics(tiny_folder, family):  # type: ignore[no-untyped-def]
    model, folder = tiny_folder(family)
    a = _metrics(model)
    b = _metrics(folder)
    # the same matrices under the same names, not one fewer: a matrix lost by either source fails here
    assert sorted(a.index) == sorted(b.index)
    for col in NUMERIC:
        np.testing.assert_allclose(
            a.loc[b.index, col].astype(float), b[col].astype(float), rtol=1e-9, equal_nan=True, err_msg=col
        )


def test_sharded_folder_equals_single_file(tiny_folder):  # type: ignore[no-untyped-def]
    _, single = tiny_folder("llama")
    _, sharded = tiny_folder("llama", shard="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = _metrics(single), _metrics(sharded)
    assert sorted(a.index) == sorted(b.index)
    pd.testing.assert_series_equal(a["stable_rank"].sort_index(), b["stable_rank"].sort_index())


def test_single_safetensors_file(tiny_folder):  # type: ignore[no-untyped-def]
    _, folder = tiny_folder("bert")
    m = _metrics(folder / "model.safetensors")
    assert (m["status"] == "ok").sum() > 10


def test_gpt2_conv1d_is_oriented_out_by_in(tiny_folder):  # type: ignore[no-untyped-def]
    model, folder = tiny_folder("gpt2")
    for src in (model, folder):
        m = _metrics(src)
        # c_attn maps 32 -> 3*32 and c_fc 32 -> 4*32: rows are output features
        assert tuple(m.loc["transformer.h.0.attn.c_attn.weight", ["rows", "cols"]]) == (96, 32)
        assert tuple(m.loc["transformer.h.0.mlp.c_fc.weight", ["rows", "cols"]]) == (128, 32)
        assert tuple(m.loc["transformer.h.0.mlp.c_proj.weight", ["rows", "cols"]]) == (32, 128)
        assert m.loc["transformer.h.0.attn.c_attn.weight", "module_type"] == "attn_qkv"


def test_tied_weights_are_analyzed_once_and_reported(tiny_folder):  # type: ignore[no-untyped-def]
    model, folder = tiny_folder("llama")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for src in (model, folder):
        m = _metrics(src)
        assert "lm_head.weight" not in m.index
        assert m.loc["model.embed_tokens.weight", "tied_to"] == "lm_head.weight"


def test_untied_head_is_its_own_row(tiny_folder):  # type: ignore[no-untyped-def]
    _, folder = tiny_folder("qwen2")
    m = _metrics(folder)
    assert m.loc["lm_head.weight", "module_type"] == "lm_head"
    assert m.loc["model.embed_tokens.weight", "tied_to"] == ""


def test_embeddings_over_50k_rows_are_kept():
    emb = torch.nn.Embedding(60_000, 16)
    m = _metrics(torch.nn.ModuleDict({"embed_tokens": emb}))
    assert m.loc["embed_tokens.weight", "status"] == "ok"
    assert m.loc["embed_tokens.weight", "rows"] == 60_000


def test_include_exclude_filters(tiny_folder):  # type: ignore[no-untyped-def]
    _, folder = tiny_folder("llama")
    m = spectune.analyze(folder, include=[r"mlp"], exclude=[r"down_proj"], progress=False).metrics
    assert set(m["module_type"]) == {"ffn_up", "ffn_gate"}


def test_gguf_source_dequantizes(tmp_path):  # type: ignore[no-untyped-def]
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w_f32 = rng.standard_normal((64, 96)).astype(np.float32)
    w_q8 = rng.standard_normal((64, 96)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", w_f32)
    q = quantize(w_q8, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    m = _metrics(path)
    assert m.loc["blk.0.attn_q.weight", "module_type"] == "attn_q"
    assert m.loc["blk.0.ffn_up.weight", "layer_index"] == 0
    s = np.linalg.svd(w_f32, compute_uv=False)
    assert m.loc["blk.0.attn_q.weight", "spectral_norm"] == pytest.approx(s[0], rel=1e-6)
    # the Q8_0 matrix is exactly what gguf's own dequantization gives (not the array before quantizing)
    w_deq = dequantize(q, gguf.GGMLQuantizationType.Q8_0).astype(np.float64)
    assert not np.array_equal(w_deq, w_q8)
    s_deq = np.linalg.svd(w_deq, compute_uv=False)
    assert m.loc["blk.0.ffn_up.weight", "frobenius_norm"] == pytest.approx(np.linalg.norm(w_deq), rel=1e-12)
    assert m.loc["blk.0.ffn_up.weight", "spectral_norm"] == pytest.approx(s_deq[0], rel=1e-10)
    assert m.loc["blk.0.ffn_up.weight", "stable_rank"] == pytest.approx((s_deq**2).sum() / s_deq[0] ** 2, rel=1e-10)
    with open_source(path) as src:
        assert {r.name: r.shape for r in src.refs}["blk.0.ffn_up.weight"] == (64, 96)


@pytest.mark.parametrize(
    "name,kind,block",
    [
        ("encoder.layer.3.attention.self.query.weight", "attn_q", 3),
        ("encoder.layer.3.attention.self.key.weight", "attn_k", 3),
        ("encoder.layer.3.attention.self.value.weight", "attn_v", 3),
        ("encoder.layer.3.attention.output.dense.weight", "attn_o", 3),
        ("encoder.layer.3.intermediate.dense.weight", "ffn_up", 3),
        ("encoder.layer.3.output.dense.weight", "ffn_down", 3),
        ("embeddings.word_embeddings.weight", "embedding", None),
        ("model.layers.12.self_attn.q_proj.weight", "attn_q", 12),
        ("model.layers.12.self_attn.o_proj.weight", "attn_o", 12),
        ("model.layers.12.mlp.gate_proj.weight", "ffn_gate", 12),
        ("model.layers.12.mlp.up_proj.weight", "ffn_up", 12),
        ("model.layers.12.mlp.down_proj.weight", "ffn_down", 12),
        ("model.embed_tokens.weight", "embedding", None),
        ("lm_head.weight", "lm_head", None),
        ("transformer.h.5.attn.c_attn.weight", "attn_qkv", 5),
        ("transformer.h.5.attn.c_proj.weight", "attn_o", 5),
        ("transformer.h.5.mlp.c_fc.weight", "ffn_up", 5),
        ("transformer.h.5.mlp.c_proj.weight", "ffn_down", 5),
        ("transformer.wte.weight", "embedding", None),
        ("blk.7.attn_output.weight", "attn_o", 7),
        ("blk.7.ffn_gate.weight", "ffn_gate", 7),
        ("token_embd.weight", "embedding", None),
        ("output.weight", "lm_head", None),
        ("pooler.dense.weight", "other", None),
    ],
)
def test_naming(name, kind, block):  # type: ignore[no-untyped-def]
    assert module_type(name) == kind
    assert layer_index(name) == block


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "bert", "gpt2"])
def test_every_block_matrix_of_real_architectures_is_classified(family):  # type: ignore[no-untyped-def]
    from tests.conftest import tiny_model

    m = _metrics(tiny_model(family))
    blocks = m[m["layer_index"].notna()]
    assert (blocks["module_type"] != "other").all(), blocks[blocks["module_type"] == "other"].index.tolist()
    assert set(blocks["layer_index"].astype(int)) == {0, 1}
