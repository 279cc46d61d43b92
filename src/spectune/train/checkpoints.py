"""Checkpoints that are checked before a resume: a completion marker written last, verified on the way back.

A run killed while the Trainer writes a checkpoint leaves a folder with some files
whole, some truncated and some missing; a folder from which spectune's own state
(the current plan, the planned epoch, the switch state) was lost would resume
silently with the epoch-0 plan. So after every save, once every callback has
written its files, ``MarkComplete`` records the size of each file in
``spectune_complete.json``. ``last_checkpoint`` takes the newest checkpoint whose
marker is there and whose files (and the spectune files the run needs) match it,
warns about each newer one it skips and why, and raises ``CheckpointError`` naming
the files when checkpoints exist but none is usable.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from spectune import _io

MARKER = "spectune_complete.json"


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be resumed from; the message names what is wrong with each."""


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by step)."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def problem(ckpt: Path, required: Sequence[str] = ()) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it can."""
    import json

    marker = ckpt / MARKER
    if not marker.exists():
        return f"{marker.name} is missing (the save did not finish)"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{marker} is unreadable ({err})"
    for name in required:
        if name not in sizes:
            return f"{ckpt / name} was never written (spectune's state for this run)"
    for name, size in sizes.items():
        f = ckpt / name
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, {size} when saved (truncated or changed)"
    return None


def last_checkpoint(run_dir: Path, required: Sequence[str] = ()) -> Path | None:
    """The newest usable checkpoint (None when there is no checkpoint at all)."""
    found = checkpoints(run_dir)
    skipped = []
    for ckpt in reversed(found):
        why = problem(ckpt, list(required))
        if why is None:
            for s in skipped:
                warnings.warn(f"skipping checkpoint {s}; resuming from {ckpt.name}", stacklevel=2)
            return ckpt
        skipped.append(f"{ckpt.name}: {why}")
    if found:
        raise CheckpointError(f"no usable checkpoint in {run_dir / 'checkpoints'}:\n  " + "\n  ".join(skipped))
    return None


class MarkComplete(TrainerCallback):
    """Writes the completion marker after every save; must be the last callback, so it runs after the others'."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.exists():
            files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
                     if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
            _io.write_json(ckpt / MARKER, {"step": state.global_step, "files": files})
