"""Peak resident memory of one stretch of work inside a long-lived process.

``getrusage``'s ``ru_maxrss`` only ever grows, so when several runs share a
process (a comparison grid) every run after the biggest would report its peak.
Linux lets a process reset its high-water mark (``VmHWM``) by writing ``5`` to
``/proc/self/clear_refs``; elsewhere the lifetime peak is the honest fallback.
"""

from __future__ import annotations

import resource
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
