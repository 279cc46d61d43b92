"""Claims: several processes sharing one output folder each take a piece of work no other holds.

A claim is a small file created with O_EXCL (atomic on POSIX and on NFSv3+), holding
``host:pid`` of its owner. A claim whose owner ran on this host and has exited is
stale and may be taken over; one from another host is trusted until it is released.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_gone(worker: str) -> bool:
    """True when ``host:pid`` names a process on this host that no longer runs (never for other hosts)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def try_claim(path: Path) -> bool:
    """Create the claim file; False when a live process holds it (a dead local holder's claim is taken over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = path.read_text().strip()
            except FileNotFoundError:
                continue  # released between the two calls: try again
            if holder == worker_id():
                return True
            if not holder_gone(holder):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(worker_id())
        return True
    return False


def held(path: Path) -> bool:
    """Whether a live process (or one on another host) holds the claim."""
    try:
        holder = path.read_text().strip()
    except FileNotFoundError:
        return False
    return not holder_gone(holder)


def release(path: Path) -> None:
    try:
        if path.read_text().strip() == worker_id():
            path.unlink()
    except FileNotFoundError:
        pass
