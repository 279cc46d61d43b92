"""The table of method kinds in docs/training.md, generated from the registry so the two cannot drift apart.

``python -m spectune.train.methods.table --write docs/training.md`` rewrites the table
between its markers after a kind is added; without ``--write`` it prints it. A test
compares the doc's table with ``kinds_table()``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spectune.train.methods import METHODS, RANKS, RATES, TRAINABLE, Method

START, END = "<!-- kinds-table:start -->", "<!-- kinds-table:end -->"
_SETS = {RATES: "rates", RANKS: "ranks", TRAINABLE: "trainable set"}


def _paper(ref: str) -> str:
    return f"[{ref}](https://arxiv.org/abs/{ref.removeprefix('arXiv:')})" if ref.startswith("arXiv:") else ref


def _row(m: Method) -> str:
    plan = ", ".join(v for k, v in _SETS.items() if k in m.plan_sets) or "nothing (no plan)"
    cells = [f"`{m.kind}`", m.trains, _paper(m.paper), f"`{m.library}`", plan, m.memory, "yes" if m.mergeable else "no"]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def kinds_table() -> str:
    """Markdown: one row per registered kind, in registry order (kind, what trains, paper, library class, what a
    plan may set, memory class, whether the result merges into a plain model)."""
    head = ["| kind | trains | paper | library class | a plan may set | memory | merges |", "|---" * 7 + "|"]
    return "\n".join(head + [_row(m) for m in METHODS.values()])


def doc_table(text: str) -> str:
    """The table between the markers of a document's text ('' when the markers are missing)."""
    if START not in text or END not in text:
        return ""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write(path: Path) -> None:
    """Replace the table between the markers in ``path`` with the registry's."""
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no {START} ... {END} markers to write the table between")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{START}\n{kinds_table()}\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="the markdown file whose table to rewrite (docs/training.md)")
    args = parser.parse_args()
    if args.write:
        write(args.write)
    else:
        print(kinds_table())


if __name__ == "__main__":
    main()
