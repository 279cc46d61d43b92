"""The one progress bar: counts what it is told, prints notes above itself, and does nothing when off."""

from __future__ import annotations

from spectune._progress import Bar


def test_a_bar_counts_describes_and_notes(capsys):  # type: ignore[no-untyped-def]
    with Bar(True, 4, "grid", prefix="[bold]analyze[/] ") as bar:
        bar.describe("trec / lora / seed 0")
        bar.advance()
        bar.advance(2)
        bar.note("failed trec / full / seed 1: diverged")
        task = bar._bar.tasks[0]
        assert (task.completed, task.total, task.description) == (3, 4, "trec / lora / seed 0")
    assert "failed trec / full / seed 1: diverged" in capsys.readouterr().out


def test_a_disabled_bar_does_nothing(capsys):  # type: ignore[no-untyped-def]
    with Bar(False, 4, "grid") as bar:
        bar.describe("x")
        bar.advance()
        bar.note("never shown")
    assert bar._bar is None and capsys.readouterr().out == ""
