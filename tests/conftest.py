"""Shared fixtures: tiny random models of the families spectune must understand, built in memory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def tiny_config(family: str):  # type: ignore[no-untyped-def]
    """A 2-block, hidden-32 config of a real transformers architecture."""
    import transformers as tf

    common = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=64, **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "gemma":
        return tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, head_dim=8, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cls = {
        "bert": tf.BertModel,
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "gemma": tf.GemmaForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
    }[family]
    return cls(cfg).eval()


@pytest.fixture
def tiny_folder(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: save a tiny model as a HF folder (optionally sharded) and return (model, folder)."""

    def make(family: str, shard: str | None = None):  # type: ignore[no-untyped-def]
        model = tiny_model(family)
        folder = tmp_path / f"{family}{'-sharded' if shard else ''}"
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
        return model, folder

    return make


def has_package(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
