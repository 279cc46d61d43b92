"""Builders shared by several test files (fixtures stay in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def llama64(assets: Path, folder: Path) -> Path:
    """A tiny Llama of hidden size 64 with MiniLM's tokenizer, saved to ``folder`` (once).

    bitsandbytes' CPU 4-bit matmul needs rows of at least one 64-value block (hidden 32
    fails inside bitsandbytes 0.50.2 with a reshape error), so the QLoRA tests use this one.
    """
    import transformers as tf

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
                        ).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (assets / "llama" / f).exists():
            shutil.copy(assets / "llama" / f, folder / f)
    return folder
