"""Peak resident memory of one stretch of work inside a long-lived process.

``getrusage``'s ``ru_maxrss`` only ever grows, so when several runs share a
process (a comparison grid) every run after the biggest would report its peak.
Linux lets a process reset its high-water mark (``VmHWM``) by writing ``5`` to
``/proc/self/clear_refs``; elsewhere the lifetime peak is the honest fallback.
``release_free_heap`` keeps one stretch's freed memory from inflating the next one's peak.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

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
