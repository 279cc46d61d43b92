"""An analysis split across ranks gives the single-process table, and each rank reads only its share.

Three levels: the pure partition functions; the engine's split-and-join run with N
ranks as threads of this process (a small in-memory stand-in for the collectives,
so options and rank counts are cheap to vary); and the real thing, ``torchrun
--nproc_per_node 2 -m spectune.cli analyze`` over gloo, against ``spectune.analyze``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import spectune
from spectune.analyze.distributed import Ranks, assign, band, cost
from spectune.analyze.sources import WeightRef
from tests.test_analysis_scale import bench_writer


# --- the partition -----------------------------------------------------------------------------


def test_assign_balances_by_cost_and_every_rank_computes_the_same_split() -> None:
    costs = [9.0, 7.0, 6.0, 5.0, 4.0, 3.0, 1.0]
    owner = assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [17.0, 18.0]  # the best split of 35
    assert owner == assign(list(costs), 2)  # deterministic: ranks agree without talking
    assert sorted(set(assign(costs, 3))) == [0, 1, 2]
    assert assign(costs, 1) == [0] * len(costs)
    assert assign([], 4) == []
    with pytest.raises(ValueError, match="world size"):
        assign(costs, 0)


def test_cost_follows_the_work_of_a_spectrum() -> None:
    assert cost(5632, 2048) == cost(2048, 5632)  # orientation does not change the Gram's size
    assert cost(5632, 2048) > cost(2048, 2048) > cost(256, 2048) > 0
    # Gram product (long x short^2) plus eigensolve (short^3): linear in the long side, cubic in the short
    assert cost(32000, 2048) == 32000 * 2048**2 + 2048**3
    assert cost(2 * 5632, 2048) < 2 * cost(5632, 2048) < cost(2 * 5632, 2 * 2048)


@pytest.mark.parametrize("n", [1, 7, 256])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_bands_cover_every_row_once(n: int, world: int) -> None:
    rows = [i for r in range(world) for i in range(*band(n, r, world))]
    assert rows == list(range(n))


# --- N ranks as threads ------------------------------------------------------------------------


class _Hub:
    """What the ranks' collectives share: one slot per rank, filled, read by all, then released."""

    def __init__(self, world: int) -> None:
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world, timeout=120)

    def exchange(self, rank: int, obj: Any) -> list[Any]:
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody refills a slot before every rank has read it
        return out


@dataclass(frozen=True)
class ThreadRanks(Ranks):
    hub: Any = None

    def all_gather(self, obj: Any) -> list[Any]:
        return self.hub.exchange(self.rank, obj)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.sum(self.hub.exchange(self.rank, np.asarray(values, dtype=np.float64)), axis=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A 3-block bf16 Llama-shaped checkpoint in 4 shards: 5 shape groups of 3-6 matrices."""
    lc = bench_writer()
    shape = lc.LlamaShape("tiny", layers=3, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=300)
    return lc.write_checkpoint(shape, tmp_path_factory.mktemp("dist") / "tiny", shard_bytes=100_000)


@pytest.fixture
def keep_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()  # ranks in threads share torch's process-wide thread count
    yield
    torch.set_num_threads(before)


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 1e-10) -> None:
    assert list(a.columns) == list(b.columns) and list(a["name"]) == list(b["name"])
    for c in a.columns:
        if pd.api.types.is_numeric_dtype(a[c]):
            np.testing.assert_allclose(a[c].astype(float), b[c].astype(float), rtol=rtol, atol=1e-300,
                                       equal_nan=True, err_msg=c)
        else:
            assert (a[c].astype(str) == b[c].astype(str)).all(), c


def split_run(model: Any, world: int, reads: dict[str, list[tuple[str, Any]]] | None = None,
              **options: Any) -> list[Any]:
    """``spectune.analyze`` on ``world`` threads joined by a hub; every rank's result, in rank order."""
    hub, results, errors = _Hub(world), [None] * world, []

    def work(rank: int) -> None:
        try:
            results[rank] = spectune.analyze(model, ranks=ThreadRanks(rank, world, hub), progress=False,
                                             device="cpu", **options)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(
    "world, options",
    [
        (2, {}),
        (3, {"ce_mode": "elementwise"}),
        (2, {"randomize": True, "alpha_estimator": "farms", "farms_window": 32}),
    ],
    ids=["2-ranks", "3-ranks-elementwise-ce", "2-ranks-randomize-farms"],
)
def test_split_analysis_equals_the_single_process_table(checkpoint, keep_threads, world, options) -> None:  # type: ignore[no-untyped-def]
    single = spectune.analyze(checkpoint, progress=False, device="cpu", **options)
    parts = split_run(checkpoint, world, **options)
    assert single.metrics["status"].eq("ok").all() and single.metrics["cs_metric"].notna().all()
    for part in parts:  # every rank ends with the whole table
        assert_same_table(single.metrics, part.metrics)
        assert list(part.spectra) == list(single.spectra)
        for name, ev in single.spectra.items():
            np.testing.assert_allclose(part.spectra[name], ev, rtol=1e-12, atol=1e-300)
        assert part.digest() == parts[0].digest()
    assert {f"spectra_s_rank{r}" for r in range(world)} <= set(parts[0].timings)


def test_each_rank_reads_only_its_matrices_and_its_band(checkpoint, keep_threads, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    full: dict[str, list[str]] = {}
    rows: dict[str, list[tuple[str, int, int, int]]] = {}
    lock = threading.Lock()
    load, load_rows = WeightRef.load, WeightRef.load_rows

    def counted_load(self: WeightRef) -> torch.Tensor:
        with lock:
            full.setdefault(threading.current_thread().name, []).append(self.name)
        return load(self)

    def counted_rows(self: WeightRef, start: int, stop: int) -> torch.Tensor:
        with lock:
            rows.setdefault(threading.current_thread().name, []).append((self.name, start, stop, self.rows))
        return load_rows(self, start, stop)

    monkeypatch.setattr(WeightRef, "load", counted_load)
    monkeypatch.setattr(WeightRef, "load_rows", counted_rows)
    split_run(checkpoint, 2)
    names = [r for r in spectune.analyze(checkpoint, progress=False, device="cpu").metrics["name"]]
    mine = [full.get(f"rank{r}", []) for r in range(2)]
    assert sorted(mine[0] + mine[1]) == sorted(names)  # each matrix loaded whole exactly once, by one rank
    assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1])
    for r in range(2):
        for name, start, stop, n in rows[f"rank{r}"]:
            lo, hi = band(n, r, 2)
            assert lo <= start < stop <= hi, (r, name, start, stop)  # only rows of its own band


# --- torchrun, 2 gloo processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_torchrun_two_processes_write_the_single_process_table(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "split"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "spectune.cli", "analyze", str(checkpoint), "--out", str(out),
           "--no-report", "--device", "cpu", "--randomize"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert proc.stdout.count("matrices (ok=") == 1  # one rank prints and writes
    single = spectune.analyze(checkpoint, progress=False, device="cpu", randomize=True)
    split = spectune.AnalysisResult.load(out)
    assert_same_table(single.metrics, split.metrics)
    timings = json.loads((out / "summary.json").read_text())["timings"]
    assert timings["spectra_s_rank0"] > 0 and timings["spectra_s_rank1"] > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
