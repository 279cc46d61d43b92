"""Claims: several processes sharing one output folder each take a piece of work no other holds.

A claim is a small file created with O_EXCL (atomic on POSIX and on NFSv3+), holding
``host:pid`` of its owner. While it works, the owner touches the file (a heartbeat,
``Heartbeat``), so a claim is stale, and may be taken over, when

- its owner ran on this host and is gone: exited, or a zombie its parent has not
  reaped yet (``os.kill(pid, 0)`` succeeds on a zombie, so the process state is read); or
- the file has not been touched for ``stale_after_s``: a holder on another machine
  that died, or lost the shared folder, cannot release its claims, but stops beating.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

STALE_AFTER_S = 900.0  # a claim untouched this long is abandoned (its holder beats every stale_after_s / 4, <= 60 s)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_zombie(pid: int) -> bool:
    """A process that has exited but not been reaped (state Z or X in /proc); False where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the command name is in parentheses and may hold spaces; the state follows the last ')'
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def holder_gone(worker: str) -> bool:
    """True when ``host:pid`` names a process on this host that has exited or is a zombie (never for other hosts)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(int(pid))


def _stale(path: Path, holder: str, stale_after_s: float) -> bool:
    if holder_gone(holder):
        return True
    try:
        return time.time() - path.stat().st_mtime > stale_after_s
    except FileNotFoundError:
        return True


def try_claim(path: Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Create the claim file; False when a live holder has it (a stale claim is taken over)."""
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
            if not _stale(path, holder, stale_after_s):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(worker_id())
        return True
    return False


def held(path: Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether a live process holds the claim (on another host: one that still beats)."""
    try:
        holder = path.read_text().strip()
    except FileNotFoundError:
        return False
    return not _stale(path, holder, stale_after_s)


def touch(path: Path) -> None:
    """The holder's heartbeat: refresh the claim's time, only while this process still holds it."""
    try:
        if path.read_text().strip() == worker_id():
            os.utime(path)
    except FileNotFoundError:
        pass


def release(path: Path) -> None:
    try:
        if path.read_text().strip() == worker_id():
            path.unlink()
    except FileNotFoundError:
        pass


def beat_every(stale_after_s: float) -> float:
    """How often a holder beats: four beats fit in the staleness window, and at least one a minute."""
    return min(60.0, stale_after_s / 4)


class Heartbeat:
    """Calls ``beat`` on entry and then every ``every`` seconds from a daemon thread, until the block ends.

    A missed beat (a storage or file system hiccup) only makes the work look older; the work goes on.
    """

    def __init__(self, beat: Callable[[], Any], every: float) -> None:
        self.beat, self.every = beat, every
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - see the class docstring
                pass

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
