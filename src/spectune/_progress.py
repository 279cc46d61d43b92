"""The one progress bar: a rich bar with a count and the elapsed time, or nothing when it is off.

Analysis counts matrices and a comparison counts cells; both show the same bar, and
anything printed while it runs (a failed cell) goes above it rather than through it.
"""

from __future__ import annotations

from typing import Any


class Bar:
    """``with Bar(enabled, total, "grid") as bar: bar.advance()``; a disabled bar does nothing."""

    def __init__(self, enabled: bool, total: int, description: str, prefix: str = "") -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn(prefix + "{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> Bar:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def describe(self, markup: str) -> None:
        """What the bar is on now (rich markup: escape names that may hold brackets)."""
        if self._bar is not None:
            self._bar.update(self._task, description=markup)

    def note(self, markup: str) -> None:
        """A line printed above the bar (or nothing, when the bar is off)."""
        if self._bar is not None:
            self._bar.console.print(markup)
