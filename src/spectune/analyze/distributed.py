"""One analysis split across processes: who analyzes which matrix, and how their rows meet.

Launched with ``torchrun --nproc_per_node N -m spectune.cli analyze MODEL ...``
(or across machines with ``--nnodes``, when every machine sees the model at the
same path), each rank:

1. computes the spectra of the matrices ``assign`` gives it (balanced by
   ``cost``, the flops of a Gram product plus an eigensolve), streaming only
   those tensors;
2. exchanges its rows, spectra and value histograms with every other rank
   (``all_gather``: a few kB per matrix, never weights);
3. reads its own ``band`` of rows of every matrix that has same-shape partners
   and adds its share of their inner products; one ``all_reduce_sum`` of those
   small k x k matrices gives every rank the exact cross-layer products, which
   are sums over elements and so split by rows without approximation.

Every rank ends with the same table; rank 0 writes it. The process group is gloo
(it carries only CPU tensors and Python objects), whatever device the spectra use.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ranks:
    """This process's place in an initialized torch.distributed process group."""

    rank: int
    world: int

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled: rows and spectra, not weights)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise float64 sum of ``values`` over the ranks, on every rank."""
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64).copy())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.numpy()


def cost(rows: int, cols: int) -> float:
    """Relative time of one matrix's spectrum: the Gram product (long x short^2) plus the eigensolve (short^3)."""
    short, long_ = sorted((int(rows), int(cols)))
    return float(long_) * short * short + float(short) ** 3


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: greedy longest-processing-time first (within 4/3 of the best split).

    Deterministic (ties go to the lower index and the lower rank), so every rank
    computes the same assignment from the same list without talking to the others.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    owner = [0] * len(costs)
    loads = [(0.0, r) for r in range(world)]
    heapq.heapify(loads)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + float(costs[i]), r))
    return owner


def band(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of an n_rows matrix that ``rank`` reads for the cross-layer products."""
    return n_rows * rank // world, n_rows * (rank + 1) // world


@contextmanager
def launched_ranks() -> Iterator[Ranks | None]:
    """The ranks of a ``torchrun`` launch (joining a gloo group if none is up), or None for one process.

    torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE 1 (or
    outside torchrun) the analysis runs as a single process. A group created here is
    destroyed on exit; one that the caller had already initialized is left alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield None
        return
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():  # --device cuda/auto: one GPU per process on a node
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")
    try:
        yield Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    finally:
        if created:
            dist.destroy_process_group()
