"""Merged models: a run's adapters folded into its base and saved as a plain Hugging Face folder.

The reference is independent of the merge code: the base loaded as the run loaded it
with PEFT's adapter applied on top (unmerged), against the merged folder loaded with
plain transformers. fp32 throughout, so the two agree within 1e-4.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
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
    # an init that rewrote the base (W_res = W - scaling B0 A0): its adapter does not belong to the checkpoint
    for init in ("pissa_niter_4", "olora", "milora", "corda"):
        with pytest.raises(TrainConfigError, match=f"output.merge: method.init={init} rewrote the frozen base"):
            load_config({**base, "method": {"kind": "lora", "init": init}, "output": {"merge": True}})
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--merged", str(tmp_path / "m")])
    assert result.exit_code == 2 and "not a spectune run folder" in result.output
