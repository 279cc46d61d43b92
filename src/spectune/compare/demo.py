"""The built-in demonstration: MiniLM in the low-data regime, spectral plans against their baselines.

What ``make demo`` runs on a fresh machine, sized to finish within 15 minutes on
2 CPU cores: TREC question classification (6 coarse classes, real labels) with
256 training questions, full fine-tuning at a uniform rate against the
``phased`` and ``alpha-balance`` per-layer rates, and uniform-rank LoRA against
``adaptive-rank`` LoRA, over 3 seeds.
"""

from __future__ import annotations

from typing import Any

from spectune.compare.config import CompareConfig, load_compare_config

DEMO: dict[str, Any] = {
    "name": "demo: MiniLM, TREC, 256 training questions",
    "base": {
        "model": {"name": "minilm", "max_length": 48},
        "train": {"epochs": 4, "batch_size": 16, "lr": 1.0e-4, "warmup_ratio": 0.1},
        "eval": {"batch_size": 128},
    },
    "tasks": {"trec": {"data": {"name": "trec", "max_examples": 256, "max_eval_examples": 500}}},
    "methods": {
        "full-uniform": {"method": {"kind": "full"}},
        "full-phased": {"method": {"kind": "full"}, "plan": {"policy": "phased"}},
        "full-alpha-balance": {"method": {"kind": "full"}, "plan": {"policy": "alpha-balance"}},
        "lora-uniform": {"method": {"kind": "lora", "r": 8, "lora_alpha": 16}, "train": {"lr": 1.0e-3}},
        "lora-adaptive-rank": {"method": {"kind": "lora", "r": 8, "lora_alpha": 16}, "train": {"lr": 1.0e-3},
                               "plan": {"policy": "adaptive-rank", "params": {"min_rank": 4, "max_rank": 16}}},
    },
    "seeds": [0, 1, 2],
    "baseline": "full-uniform",
    "pairs": {"lora-adaptive-rank": "lora-uniform"},
    "metric": "accuracy",
    "output_dir": "out/demo",
}


def demo_config(out_dir: str | None = None, seeds: int = 3, overrides: list[str] | None = None) -> CompareConfig:
    data = dict(DEMO, seeds=list(range(seeds)))
    if out_dir is not None:
        data["output_dir"] = out_dir
    return load_compare_config(data, overrides)
