"""Peak resident memory of one stretch of work inside a long-lived process.

``getrusage``'s ``ru_maxrss`` only ever grows, so when several runs share a
process (a comparison grid) every run after the biggest would report its peak.
Linux lets a process reset its high-water mark (``VmHWM``) by writing ``5`` to
``/proc/self/clear_refs``; elsewhere the lifetime peak is the honest fallback.
``release_free_heap`` keeps one stretch's freed memory from inflating the next one's peak.

The accelerator and optimizer measures live here too, so a comparison grid, the
training run's cost callback (``spectune.train.cost``) and a memory benchmark
count the same things the same way: the CUDA allocator's high-water mark (reset
per stretch, like the resident one) and the elements the optimizer keeps per
trained parameter (Adam's two moments, 8-bit or factored states, step counters).
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")


def reset_peak() -> bool:
    """Start a new peak-memory window; False where the platform cannot (then peaks are lifetime peaks)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last ``reset_peak`` (or process start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_heap() -> None:
    """Hand memory that was freed back to the operating system (glibc ``malloc_trim``).

    glibc keeps freed blocks below its mmap threshold (which grows up to 32 MB as
    large blocks are freed) in the heap for reuse, so after a group of large matrices
    the process stays as big as its peak, and the next group's peak stacks on top.
    Trimming between groups keeps the analysis' resident set at one group's working
    set. A no-op where the C library has no ``malloc_trim`` (macOS, musl).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _cuda() -> Any | None:
    """torch.cuda where a CUDA device is present (torch is imported only when it is already loaded or asked for)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return torch.cuda if torch.cuda.is_available() else None


def reset_cuda_peak() -> bool:
    """Start a new CUDA peak window on the current device; False without CUDA."""
    cuda = _cuda()
    if cuda is None:
        return False
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    return True


def cuda_peak_mb() -> float | None:
    """Peak CUDA memory allocated by tensors (MiB) since the last ``reset_cuda_peak``; None without CUDA.

    ``max_memory_allocated`` counts tensors, not the caching allocator's reserve: it is
    what a method needs, and what another run on the same card would have to leave free.
    """
    cuda = _cuda()
    if cuda is None:
        return None
    return float(cuda.max_memory_allocated()) / 2**20


def _state_tensors(optimizer: Any) -> Iterator[Any]:
    import torch

    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers hold the real one
    for state in getattr(inner, "state", {}).values():
        for value in (state.values() if isinstance(state, dict) else [state]):
            if isinstance(value, torch.Tensor):
                yield value


def optimizer_state_numel(optimizer: Any) -> int:
    """Elements held in the optimizer's state: every tensor in ``optimizer.state``, counted as it is.

    For AdamW that is two moments per trained element plus one step counter per
    trained tensor; for SGD without momentum it is 0. Counted from the real state
    tensors, so a factored, low-rank or 8-bit optimizer reports what it keeps.
    Zero before the first step (optimizers create their state lazily).
    """
    return int(sum(t.numel() for t in _state_tensors(optimizer)))


def optimizer_state_mb(optimizer: Any) -> float:
    """Bytes of the optimizer's state tensors (MiB): what its dtype (fp32, bf16, 8-bit) makes of the count."""
    return float(sum(t.numel() * t.element_size() for t in _state_tensors(optimizer))) / 2**20
