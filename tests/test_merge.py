"""Merged models: a run's adapters folded into its base and saved as a plain Hugging Face folder.

The reference is independent of the merge code: the base loaded as the run loaded it
with PEFT's adapter applied on top (unmerged), against the merged folder loaded with
plain transformers. fp32 throughout, so the two agree within 1e-4.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from spectune.cli import app
from spectune.train import TrainConfigError, load_config
from spectune.train.merge import MergeError, export_merged
from spectune.train.methods import METHODS
from spectune.train.run import run
from tests.helpers import llama64

pytestmark = pytest.mark.slow


def _run(assets: Path, out: Path, task: str, method: dict, model: str | None = None) -> Path:
    data = {"path": str(assets / ("cls.csv" if task == "classification" else "lm.jsonl")), "seed": 0}
    cfg = load_config({
        "model": {"name": model or str(assets / ("bert" if task == "classification" else "llama")), "max_length": 16},
        "data": data, "method": method,
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "seed": 0},
        "eval": {"every": "no", "batch_size": 32, "final_splits": ["validation"]},
        "output": {"dir": str(out), "save_every": "no"},
        "logging": {"tensorboard": False, "progress": False, "track_metrics": []},
    })
    run(cfg)
    return out


def _adapted_logits(run_dir: Path, task: str, batch: dict) -> torch.Tensor:
    """The trained model as PEFT applies it at inference (adapter on top of the base, not merged)."""
    from peft import PeftModel

    from spectune.train.merge import head_labels, run_config
    from spectune.train.model import load_model

    cfg = run_config(run_dir)
    base, _ = load_model(cfg, task, head_labels(run_dir / "final") if task == "classification" else None)
    if getattr(base, "is_loaded_in_4bit", False):
        from spectune.train.methods.qlora import keep_cpu_4bit_differentiable

        # the layout training computed with; bitsandbytes' CPU inference repack computes in bfloat16 (about 1e-3 off)
        keep_cpu_4bit_differentiable(base)
    model = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def _plain_logits(folder: Path, task: str, batch: dict) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**batch).logits


def _batch(folder: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return dict(tok(["good great fine table", "bad awful sad door window"], return_tensors="pt", padding=True))


NEW_KINDS = [k for k in ("loha", "lokr", "hra", "vera", "oft", "boft", "fourierft", "miss", "randlora") if k in METHODS]
SIZES = {"fourierft": {"n_frequency": 128}, "miss": {"r": 8}}  # the tiny Llama's matrices are 32 wide (16 for k/v)
CASES = [("lora", "classification"), ("dora", "causal_lm"), ("rslora", "causal_lm"),
         *[(k, "causal_lm") for k in NEW_KINDS]]


@pytest.mark.parametrize("kind,task", CASES)
def test_merged_folder_has_the_adapted_models_logits(assets, tmp_path, kind, task):  # type: ignore[no-untyped-def]
    run_dir = _run(assets, tmp_path / "run", task, {"kind": kind, **SIZES.get(kind, {})})
    out = export_merged(run_dir, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    batch = _batch(out)
    adapted, merged = _adapted_logits(run_dir, task, batch), _plain_logits(out, task, batch)
    untrained = _plain_logits(assets / ("llama" if task == "causal_lm" else "bert"), task, batch) if task == "causal_lm" else None
    assert torch.allclose(merged, adapted, atol=1e-4, rtol=0), (merged - adapted).abs().max()
    if untrained is not None:  # the adapters changed something, so the equality above is not the base's with itself
        assert not torch.allclose(merged, untrained, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora_merges_into_the_dequantized_base(assets, tmp_path):  # type: ignore[no-untyped-def]
    model = llama64(assets, tmp_path / "llama64")
    run_dir = _run(assets, tmp_path / "run", "causal_lm", {"kind": "qlora", "r": 4, "compute_dtype": "float32"},
                   model=str(model))
    result = CliRunner().invoke(app, ["export", str(run_dir), "--merged", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    batch = _batch(tmp_path / "merged")
    adapted, merged = _adapted_logits(run_dir, "causal_lm", batch), _plain_logits(tmp_path / "merged", "causal_lm", batch)
    assert torch.allclose(merged, adapted, atol=1e-4, rtol=0), (merged - adapted).abs().max()
    # the merged weights are the 4-bit ones the adapters saw, not the fp32 checkpoint's
    assert not torch.allclose(merged, _plain_logits(model, "causal_lm", batch), atol=1e-3)


def test_output_merge_writes_merged_beside_final(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = load_config({"model": {"name": str(assets / "bert"), "max_length": 16},
                       "data": {"path": str(assets / "cls.csv"), "seed": 0}, "method": {"kind": "lora"},
                       "train": {"max_steps": 2, "batch_size": 8}, "eval": {"every": "no", "final_splits": []},
                       "output": {"dir": str(tmp_path / "run"), "save_every": "no", "merge": True},
                       "logging": {"tensorboard": False, "progress": False, "track_metrics": []}})
    run(cfg)
    assert (tmp_path / "run" / "merged" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "merged" / "adapter_config.json").exists()


def test_a_kind_that_cannot_merge_is_refused_in_one_line(assets, tmp_path):  # type: ignore[no-untyped-def]
    base = {"data": {"path": str(assets / "cls.csv")}, "method": {"kind": "prompt_tuning"}}
    with pytest.raises(TrainConfigError, match=r"output\.merge: kind prompt_tuning cannot be merged"):
        load_config({**base, "output": {"merge": True}})
    run_dir = tmp_path / "run"  # a finished prompt-tuning run's folder, as training leaves it
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(load_config(base).to_yaml())
    (run_dir / "summary.json").write_text('{"task": "classification"}')
    (run_dir / "final" / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    with pytest.raises(MergeError, match="kind prompt_tuning cannot be merged") as err:
        export_merged(run_dir, tmp_path / "merged")
    assert "\n" not in str(err.value) and not (tmp_path / "merged").exists()
    # an init that rewrote the base where the adapter cannot be carried over to the checkpoint
    for method in ({"kind": "dora", "init": "pissa_niter_4"}, {"kind": "lora", "init": "loftq"}):
        with pytest.raises(TrainConfigError, match=f"output.merge: method.init={method['init']} rewrote the frozen base"):
            load_config({**base, "method": method, "output": {"merge": True}})
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--merged", str(tmp_path / "m")])
    assert result.exit_code == 2 and "not a spectune run folder" in result.output


class Logits(TrainerCallback):
    """The trained model's logits on a batch as the run ends, before anything is saved: what the layers computed."""

    def __init__(self, batch: dict) -> None:
        self.batch, self.logits = batch, None

    def on_train_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
        model.eval()
        with torch.no_grad():
            self.logits = model(**self.batch).logits.float().clone()


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora", "milora", "corda", "lora_ga"])
def test_a_base_rewriting_init_saves_an_adapter_over_the_checkpoint_and_merges(assets, tmp_path, init):  # type: ignore[no-untyped-def]
    """final/ is B A - B0 A0 at rank 2r: over the unchanged checkpoint it computes what training ended with."""
    task, out = "causal_lm", tmp_path / "run"
    probe = Logits(_batch(assets / "llama"))
    cfg = load_config({
        "model": {"name": str(assets / "llama"), "max_length": 16},
        "data": {"path": str(assets / "lm.jsonl"), "seed": 0}, "method": {"kind": "lora", "r": 4, "init": init},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "seed": 0},
        "eval": {"every": "no", "batch_size": 32, "final_splits": []},
        "output": {"dir": str(out), "save_every": "no", "merge": True},
        "logging": {"tensorboard": False, "progress": False, "track_metrics": []},
    })
    run(cfg, extra_callbacks=[probe])
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 32, True)  # r 4, alpha 16 before
    assert json.loads((out / "final" / "converted_from_init.json").read_text())["init"] == init
    batch = probe.batch
    adapted, merged = _adapted_logits(out, task, batch), _plain_logits(out / "merged", task, batch)
    assert torch.allclose(adapted, probe.logits, atol=1e-4, rtol=0), (adapted - probe.logits).abs().max()
    assert torch.allclose(merged, probe.logits, atol=1e-4, rtol=0), (merged - probe.logits).abs().max()
    # and the training moved it: the equality is not the checkpoint's with itself
    assert not torch.allclose(_plain_logits(assets / "llama", task, batch), probe.logits, atol=1e-3)
    # a run trained before adapters were converted holds one over W_res: refused, not merged wrong
    (out / "final" / "converted_from_init.json").unlink()
    with pytest.raises(MergeError, match=f"method.init={init} rewrote the frozen base"):
        export_merged(out, tmp_path / "again")


def test_difference_factors_multiply_to_the_trained_minus_the_initial_product():
    from spectune.train.methods.lora_convert import difference_factors, doubled_config

    g = torch.Generator().manual_seed(0)
    a, a0, b, b0 = (torch.randn(s, generator=g) for s in [(3, 7), (3, 7), (5, 3), (5, 3)])
    names = {"m.lora_A.weight": a, "m.lora_B.weight": b}
    out = difference_factors({**names, "head.weight": torch.ones(2)}, {"m.lora_A.weight": a0, "m.lora_B.weight": b0})
    assert set(out) == set(names)
    assert torch.allclose(out["m.lora_B.weight"] @ out["m.lora_A.weight"], b @ a - b0 @ a0, atol=1e-5)
    with pytest.raises(ValueError, match="lacks 1 of the initial factors"):
        difference_factors({"m.lora_A.weight": a}, {"m.lora_A.weight": a0, "m.lora_B.weight": b0})
    doubled = doubled_config({"r": 4, "lora_alpha": 8, "rank_pattern": {"q": 2}, "alpha_pattern": {"q": 4},
                              "init_lora_weights": "corda", "corda_config": {"x": 1}})
    assert (doubled["r"], doubled["lora_alpha"], doubled["rank_pattern"], doubled["alpha_pattern"]) == (8, 16, {"q": 4}, {"q": 8})
    assert doubled["init_lora_weights"] is True and doubled["corda_config"] is None
    rs = doubled_config({"r": 4, "lora_alpha": 8, "use_rslora": True})
    assert rs["lora_alpha"] / rs["r"] ** 0.5 == pytest.approx(8 / 4 ** 0.5)  # rsLoRA's scaling alpha / sqrt(r) kept
