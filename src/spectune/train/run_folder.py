"""The run folder: refuse what would mix two runs in one folder, and find where a resumed run continues."""

from __future__ import annotations

import json
from pathlib import Path

from spectune import _io
from spectune._config import first_difference
from spectune.train import callbacks as cb
from spectune.train.checkpoints import checkpoints, last_checkpoint
from spectune.train.config import TrainConfig, stored_config_yaml


class ConfigChanged(ValueError):
    """``--resume`` with a config that differs from the one the run started with."""


def required_state(cfg: TrainConfig) -> list[str]:
    """spectune's own files a checkpoint of this run must hold to resume it as the run it was."""
    need = []
    if cfg.plan.policy and cfg.plan.replan != "never":
        need += [cb.STATE_FILE, "spectune_plan.yaml"]
    if cfg.plan.switch_to_light:
        need.append(cb.SWITCH_FILE)
    return need


def check_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool, allow_change: bool) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None for a fresh run) and the recorded config changes; refuses what would mix runs.

    Every rank checks the folder before any rank writes to it. No rank can write a
    checkpoint before all ranks have joined the first training step, so the ranks
    see the same checkpoints here and agree on refusing (or resuming).
    """
    ckpt = last_checkpoint(run_dir, required_state(cfg)) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if not resume and checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another output.dir")
    return ckpt, (check_resumed_config(cfg, run_dir, ckpt, allow_change) if ckpt is not None else [])


def check_resumed_config(cfg: TrainConfig, run_dir: Path, ckpt: Path, allow_change: bool) -> list[str]:
    """Refuse a resume under another config (naming the first differing key) unless allowed; then record it."""
    stored = run_dir / "config.yaml"
    was = stored_config_yaml(stored.read_text()) if stored.exists() else None
    if was is None or was == cfg.to_yaml():
        return []
    change = first_difference(was, cfg.to_yaml())
    if not allow_change:
        raise ConfigChanged(
            f"--resume: the config differs from the one {run_dir} was started with ({change}); resume with the "
            "original config, or pass --allow-config-change to continue under this one (it is then recorded)")
    _io.write_text(run_dir / f"config-before-resume-{ckpt.name}.yaml", stored.read_text())
    return [f"resumed from {ckpt.name} with a changed config: {change}"]


def earlier_changes(run_dir: Path) -> list[str]:
    """Config changes recorded by earlier resumes of this run (kept across further resumes)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("config_changes") or [])
