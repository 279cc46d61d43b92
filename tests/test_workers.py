"""Workers that die: claims of dead or silent holders expire, and a helper killed in either phase of
``spectune compare --workers 2`` is reaped, reported, and its work done by the others (tiny BERT)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from spectune import _claim
from spectune.compare import load_compare_config
from spectune.compare.run import HelperWatch, compare, exit_reason

HOST = socket.gethostname()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see a zombie")
def test_a_zombie_or_exited_holder_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not _claim.holder_gone(f"{HOST}:{child.pid}")  # alive
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while _state(child.pid) != "Z" and time.time() < deadline:
            time.sleep(0.02)
        assert _state(child.pid) == "Z"  # dead but not reaped: os.kill(pid, 0) still succeeds on it
        os.kill(child.pid, 0)
        assert _claim.holder_gone(f"{HOST}:{child.pid}")
    finally:
        child.kill()
        child.wait()
    assert _claim.holder_gone(f"{HOST}:{child.pid}")  # reaped: no such process
    assert not _claim.holder_gone(f"{HOST}:{os.getpid()}") and not _claim.holder_gone(f"elsewhere:{child.pid}")


def test_a_claim_from_another_host_expires_when_its_heartbeat_stops(tmp_path):  # type: ignore[no-untyped-def]
    claim = tmp_path / "cells" / "seed-0.claim"
    claim.parent.mkdir(parents=True)
    claim.write_text("another-machine:4242")
    assert _claim.held(claim, stale_after_s=60) and not _claim.try_claim(claim, stale_after_s=60)
    old = time.time() - 61
    os.utime(claim, (old, old))  # its holder stopped beating a minute ago
    assert not _claim.held(claim, stale_after_s=60)
    assert _claim.try_claim(claim, stale_after_s=60) and claim.read_text() == _claim.worker_id()  # taken over

    os.utime(claim, (old, old))
    with _claim.Heartbeat(lambda: _claim.touch(claim), every=0.05):  # the holder's beat keeps it fresh
        time.sleep(0.2)
    assert time.time() - claim.stat().st_mtime < 1 and _claim.held(claim, stale_after_s=60)
    claim.write_text("another-machine:4242")
    os.utime(claim, (old, old))
    _claim.touch(claim)  # never refreshes a claim this process does not hold
    assert claim.stat().st_mtime == pytest.approx(old)
    assert _claim.beat_every(900) == 60 and _claim.beat_every(20) == 5


def test_the_watch_reaps_a_killed_helper_and_says_why_once(tmp_path):  # type: ignore[no-untyped-def]
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]),
             subprocess.Popen([sys.executable, "-c", "pass"])]
    lines: list[str] = []
    with HelperWatch(procs, tmp_path, lines.append, every=0.05):
        procs[0].send_signal(signal.SIGKILL)
        deadline = time.time() + 10
        while not lines and time.time() < deadline:
            time.sleep(0.05)
        assert procs[0].returncode == -signal.SIGKILL  # reaped by the watch, not left a zombie
    assert len(lines) == 1 and lines[0].startswith(f"worker 1 (pid {procs[0].pid}) stopped: killed by SIGKILL")
    assert "out-of-memory" in lines[0] and str(tmp_path / "worker-1.log") in lines[0]  # the one that ended well is silent
    assert exit_reason(3) == "exited with status 3" and exit_reason(-15) == "killed by SIGTERM"


def _grid(assets: Path, out: Path, **extra) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return {"name": "tiny-workers",
            "base": {"model": {"name": str(assets / "bert"), "max_length": 16},
                     "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3}, "eval": {"batch_size": 64}},
            "tasks": {"toy": {"data": {"path": str(assets / "cls.csv")}}},
            "output_dir": str(out), **extra}


def _kill_when(find, lines: list[str], timeout: float = 240) -> int:  # type: ignore[no-untyped-def]
    """Wait until ``find()`` names a helper's pid, kill it, and wait for the parent's report of it."""
    deadline = time.time() + timeout
    pid = None
    while pid is None and time.time() < deadline:
        pid = find()
        time.sleep(0.1)
    assert pid is not None, "the helper never took any work"
    os.kill(pid, signal.SIGKILL)
    while not any(f"(pid {pid}) stopped: killed by SIGKILL" in line for line in lines) and time.time() < deadline:
        time.sleep(0.1)
    return pid


def _foreign(holder: str) -> int | None:
    host, _, pid = holder.rpartition(":")
    return int(pid) if host == HOST and pid.isdigit() and int(pid) != os.getpid() else None


@pytest.mark.slow
def test_a_helper_killed_mid_trial_leaves_the_exact_budget_and_every_cell(assets, tmp_path):  # type: ignore[no-untyped-def]
    import optuna

    from spectune.compare.search import storage, study_name

    out = tmp_path / "search-kill"
    cfg = load_compare_config(_grid(assets, out, methods={"full": {}}, seeds=[0], search={
        "trials": 3, "seeds": [10], "sampler": "grid", "pruner": "none",
        "space": {"train.lr": {"ratio": [0.1, 1.0], "log": True, "points": 3}}}))
    lines: list[str] = []
    killed: list[int] = []

    def helper_trial() -> int | None:
        study = optuna.load_study(study_name=study_name(cfg, "toy", "full"), storage=storage(cfg))
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        return next((p for t in running if (p := _foreign(str(t.user_attrs.get("worker", "")))) is not None), None)

    def on_line(line: str) -> None:  # the parent's line after its first trial: hold it until the helper is killed
        lines.append(line)
        if line.startswith("search toy / full trial") and not killed:
            killed.append(_kill_when(helper_trial, lines))

    result = compare(cfg, progress=False, on_line=on_line, workers=2)
    assert killed and any(f"worker 1 (pid {killed[0]}) stopped: killed by SIGKILL" in line for line in lines)
    trials = pd.read_csv(out / "search" / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 3 and done["param:train.lr"].nunique() == 3  # exactly the budget, every grid point once
    stale = trials[trials["state"] == "FAIL"]
    assert len(stale) == 1 and stale["reason"].iloc[0].startswith("stale") and stale["worker"].iloc[0].endswith(f":{killed[0]}")
    assert stale["param:train.lr"].iloc[0] in set(done["param:train.lr"])  # its values were queued again and trained
    assert list(result.results["status"]) == ["ok"]


@pytest.mark.slow
def test_a_helper_killed_holding_a_final_cell_leaves_every_cell(assets, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "cell-kill"
    cfg = load_compare_config(_grid(assets, out, methods={"full": {}, "phased": {"plan": {"policy": "phased"}}},
                                    seeds=[0, 1]))
    lines: list[str] = []
    killed: list[int] = []

    def helper_cell() -> int | None:
        for claim in (out / "cells").rglob("seed-*.claim"):
            try:
                pid = _foreign(claim.read_text().strip())
            except FileNotFoundError:
                continue
            if pid is not None:
                return pid
        return None

    def on_cell(cell, row) -> None:  # type: ignore[no-untyped-def]  # after the parent's first cell
        if not killed:
            killed.append(_kill_when(helper_cell, lines))

    result = compare(cfg, progress=False, on_cell=on_cell, workers=2, on_line=lines.append)  # the watch's thread appends
    assert killed and any(f"(pid {killed[0]}) stopped: killed by SIGKILL" in line for line in lines)
    df = result.results
    assert len(df) == 4 and set(df["status"]) == {"ok"}  # the dead helper's cell was trained by the parent
    assert not list((out / "cells").rglob("*.claim"))
