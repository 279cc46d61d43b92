"""``spectune compare --budget --export-best``: the cost columns, the front in the report, and a config that
``spectune train`` turns back into the final cell it came from (tiny BERT, LoRA arms, a searched rate)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from spectune.compare import load_compare_config
from spectune.compare.config import cell_dir
from spectune.compare.run import compare

pytestmark = pytest.mark.slow


def test_export_best_reproduces_the_chosen_final_cell(assets, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "cmp"
    cfg = load_compare_config({
        "name": "tiny-export",
        "base": {"model": {"name": str(assets / "bert"), "max_length": 16},
                 "method": {"kind": "lora", "lora_alpha": 16, "train_head": True},
                 "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3}, "eval": {"batch_size": 64}},
        "tasks": {"toy": {"data": {"path": str(assets / "cls.csv")}}},
        "methods": {"lora-r2": {"method": {"r": 2}}, "lora-r8": {"method": {"r": 8}}},
        "seeds": [0, 1],
        "search": {"trials": 2, "seeds": [10], "sampler": "grid", "pruner": "none",
                   "space": {"train.lr": {"ratio": [0.3, 1.0], "log": True, "points": 2}}},
        "output_dir": str(out),
    })
    result = compare(cfg, progress=False, budgets_mb=[1e6], export_dir=tmp_path / "best")

    # cost in every table: per cell, per trial, and as mean and interval over seeds
    cells = pd.read_csv(out / "results.csv")
    assert cells["seconds_per_step"].gt(0).all() and cells["optimizer_state_parameters"].gt(0).all()
    trials = pd.read_csv(out / "search" / "trials.csv")
    assert trials["peak_memory_mb"].gt(0).all() and trials["seconds_per_step"].gt(0).all()
    assert (trials["optimizer_state_parameters"] > 2 * trials["trainable_parameters"]).all()
    summary = pd.read_csv(out / "summary.csv")
    assert {"peak_memory_mb_ci_low", "seconds_per_step_ci_high", "optimizer_state_parameters"} <= set(summary)
    front = pd.read_csv(out / "front.csv")
    assert front["on_memory_front"].any() and len(result.advice) == 1 and result.advice[0].startswith("toy, within 976.56 GB")
    assert (out / "plots" / "toy_memory.png").exists() and (out / "plots" / "toy_time.png").exists()
    assert "What to run" in (out / "results.md").read_text() and "Quality against cost" in result.report.read_text()

    # the export: the chosen method's final cell, searched rate filled in
    choice = json.loads((tmp_path / "best" / "toy" / "choice.json").read_text())
    method = choice["method"]
    chosen_lr = result.search.chosen["toy"][method]["values"]["train.lr"]
    exported = yaml.safe_load((tmp_path / "best" / "toy" / "config.yaml").read_text())
    cell = yaml.safe_load((cell_dir(cfg, "toy", method, 0) / "config.yaml").read_text())
    assert exported["train"]["lr"] == pytest.approx(chosen_lr) and exported["method"]["r"] == cell["method"]["r"]
    assert exported["output"].pop("dir") == str(tmp_path / "best" / "toy" / "run") and exported["output"].pop("save_final")
    cell["output"].pop("dir"), cell["output"].pop("save_final")
    assert exported == cell  # every other key as the cell trained
    adapter = json.loads((tmp_path / "best" / "toy" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == cell["method"]["r"] and adapter["lora_alpha"] == 16

    # spectune train on it trains the same run: the same test score as the final cell at that seed
    from spectune.train import load_config
    from spectune.train.run import run

    trained = run(load_config(tmp_path / "best" / "toy" / "config.yaml"))
    final = json.loads((cell_dir(cfg, "toy", method, 0) / "summary.json").read_text())["metrics"]
    assert trained.metrics["test_accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-6)
    assert trained.metrics["validation_loss"] == pytest.approx(final["validation_loss"], rel=1e-5)
    saved = json.loads((tmp_path / "best" / "toy" / "run" / "final" / "adapter_config.json").read_text())
    assert saved["r"] == adapter["r"] and sorted(saved["target_modules"]) == sorted(adapter["target_modules"])
