"""``SpectralPlanCallback`` in a user's own script: a plain transformers Trainer and a TRL trainer.

The callback rebuilds the optimizer the Trainer made into the plan's groups before the
first step; the rates the optimizer then holds must be the plan's, matrix by matrix.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from spectune.integrations import SpectralPlanCallback, regroup
from spectune.plan.schema import Plan


class GroupsAtFirstStep(TrainerCallback):
    """The optimizer's groups as the first step begins (after every on_train_begin)."""

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        if state.global_step == 0:
            self.groups = [{k: v for k, v in g.items() if k != "params"} | {"numel": sum(p.numel() for p in g["params"])}
                           for g in optimizer.param_groups]


def _check_rates(groups: list[dict[str, Any]], plan: Plan, lr: float) -> None:
    matched = 0
    for g in groups:
        key = next((k for k in plan.lr_scale if g["name"] == k or g["name"].endswith("." + k)), None)
        if key is not None:
            assert g["lr"] == pytest.approx(lr * plan.lr_scale[key]), g["name"]
            matched += 1
    assert matched >= 8 and len(groups) > 2  # one group per parameter, not the Trainer's decay / no-decay pair
    assert len({round(g["lr"], 12) for g in groups if g["numel"] > 1}) > 1  # a real per-matrix plan


def _args(out: Path, **kw: Any) -> dict[str, Any]:
    return {"output_dir": str(out), "per_device_train_batch_size": 4, "learning_rate": 1e-3, "weight_decay": 0.01,
            "lr_scheduler_type": "constant", "report_to": [], "save_strategy": "no", "logging_steps": 1,
            "use_cpu": True, "disable_tqdm": True, **kw}


def test_plain_trainer_trains_at_the_plan_rates_and_replans(assets: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(assets / "llama")
    rng = random.Random(0)
    ids = [[rng.randrange(1000, 2000) for _ in range(16)] for _ in range(16)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    plan_cb, seen = SpectralPlanCallback("phased", replan="epoch", track_every_steps=2), GroupsAtFirstStep()
    trainer = Trainer(model=model, args=TrainingArguments(**_args(tmp_path, num_train_epochs=2)), train_dataset=data,
                      callbacks=[plan_cb, seen])
    trainer.train()
    first = Plan.load(tmp_path / "plans" / "plan-epoch0-step0.yaml")
    _check_rates(seen.groups, first, 1e-3)
    assert [h["epoch"] for h in plan_cb.history] == [1]  # re-planned once, at the second epoch
    assert (tmp_path / "plans" / "plan-epoch1-step4.yaml").exists()
    assert (tmp_path / "spectral_trajectory.parquet").exists()
    decays = {g["name"]: g["weight_decay"] for g in seen.groups}
    assert all(v == 0 for k, v in decays.items() if "norm" in k)  # 1-D parameters: no decay, as spectune train


def test_trl_dpo_trainer_trains_at_the_plan_rates(assets: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    folder = tmp_path / "llama"
    shutil.copytree(assets / "llama", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder)
    pairs = Dataset.from_list([{"prompt": f"say {i}", "chosen": "good kind nice", "rejected": "bad mean rude"}
                               for i in range(8)])
    plan_cb, seen = SpectralPlanCallback("phased", replan="never"), GroupsAtFirstStep()
    args = DPOConfig(**_args(tmp_path, num_train_epochs=1, max_length=32, gradient_checkpointing=False, bf16=False))
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok, callbacks=[plan_cb, seen])
    trainer.train()
    _check_rates(seen.groups, Plan.load(tmp_path / "plans" / "plan-epoch0-step0.yaml"), 1e-3)


def test_an_optimizer_that_has_stepped_is_refused() -> None:
    w = torch.nn.Parameter(torch.ones(3, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()
    with pytest.raises(RuntimeError, match="already holds state"):
        regroup(opt, None, [{"params": [w], "lr": 0.1, "name": "w"}])


def test_unknown_policy_or_parameter_fails_at_construction() -> None:
    from spectune.plan.schema import PlanError

    with pytest.raises(PlanError, match="unknown policy"):
        SpectralPlanCallback("no-such-policy")
    with pytest.raises(PlanError, match="lr_min_ratio"):
        SpectralPlanCallback("alpha-balance", {"lr_min_ratio": -1})
