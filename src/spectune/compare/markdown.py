"""``results.md``: a comparison in Markdown, to commit beside the code (docs/results.md quotes these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from spectune import _io
from spectune.compare.config import CompareConfig
from spectune.compare.console import console_rows
from spectune.compare.pareto import recommendations
from spectune.compare.report import comparison_tables, findings, search_tables
from spectune.compare.stats import task_metrics

def write_markdown(df: pd.DataFrame, cfg: CompareConfig, out_dir: str | Path, command: str | None = None,
                   tables: dict[str, pd.DataFrame] | None = None, search: Any = None, advice: list[str] | None = None) -> Path:
    """``results.md``: the findings and the per-task table in Markdown, figures linked from ``plots/``.

    Written beside report.html so a comparison can be committed to a repository's
    docs as it is (docs/results.md is one).
    """
    out = Path(out_dir)
    tables = tables if tables is not None else comparison_tables(df, cfg)
    rows = pd.DataFrame(console_rows(tables["summary"], tables["paired"], tables["front"]))
    advice = recommendations(tables["front"]) if advice is None else advice
    lines = [f"# {md_escape(cfg.name)}", ""]
    if command:
        lines += [f"Reproduce: {md_code(command)}", ""]
    lines += [
        f"{len(cfg.tasks)} task(s) x {len(cfg.methods)} method(s) x {len(cfg.seeds)} seed(s), baseline `{cfg.baseline}`"
        + "".join(f", `{m}` against `{b}`" for m, b in cfg.pairs.items()) + ". "
        "Means with 95% Student-t intervals over seeds; `difference` is the paired difference to the method in `vs` "
        "(same seed = same training rows) with its interval, `p` the paired t-test, `w/t/l` seeds won, tied, lost.",
        "",
        "## Findings",
        "",
        *[f"- {s}" for s in findings(tables["paired"], tables["summary"])],
        "",
    ]
    if advice:
        lines += ["## What to run (quality against peak memory)", "",
                  "On the front: no method with lower or equal memory is significantly better (paired 95% interval); "
                  "the recommendation is the least-memory method nothing within the budget beats. "
                  + ("Each final cell's peak was measured in its own process (`fresh_process: true`)."
                     if cfg.fresh_process else
                     "Peaks were measured in long-lived worker processes, so a cell's peak also holds what earlier "
                     "cells left in the heap: differences of a few hundred MB may be that history "
                     "(`fresh_process: true` measures each cell alone)."), "",
                  *[f"- {md_escape(a)}" for a in advice], ""]
    for task in task_metrics(df, cfg.metric):
        part = rows[rows["task"] == task].drop(columns=["task"])
        lines += [f"## {task}", "", part.to_markdown(index=False, floatfmt=".4g"), ""]
        for kind in ("scores", "differences", "memory", "time", "cost", "gap"):
            if (out / "plots" / f"{task}_{kind}.png").exists():
                lines.append(f"![{task} {kind}](plots/{task}_{kind}.png)")
        lines.append("")
    wtl = tables["win_tie_loss"]
    if not wtl.empty:
        lines += ["## Wins, ties and losses against the baseline, all tasks", "", wtl.to_markdown(index=False), ""]
    if (out / "plots" / "curve.png").exists() and cfg.curve:
        lines += [f"## Paired difference against `{cfg.curve}`", "", "![curve](plots/curve.png)", ""]
    if search is not None and cfg.search is not None:
        chosen, _ = search_tables(search)
        s = cfg.search
        lines += ["## Search", "",
                  f"{s.trials} trials per task x searched method on search seeds {s.seeds} (validation only), "
                  f"sampler {s.sampler}, pruner {s.pruner}; the values each method's final cells used:", "",
                  chosen.to_markdown(index=False, floatfmt=".4g") if not chosen.empty else "(no trial finished)", ""]
        if search.unfinished:
            lines += ["Still searching (no value chosen yet): "
                      + ", ".join(md_escape(f"{t} / {m}") for t, m in search.unfinished) + ".", ""]
        for task in cfg.tasks:
            if (out / "plots" / f"{task}_search.png").exists():
                lines.append(f"![{task} search](plots/{task}_search.png)")
        lines.append("")
    return _io.write_text(out / "results.md", "\n".join(lines))



def md_escape(text: str) -> str:
    """Text shown literally in Markdown (results.md is committed into docs, where markup would render)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|" else ch for ch in text)



def md_code(text: str) -> str:
    """An inline code span that holds any text: fenced by more backticks than the text's longest run."""
    import re

    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
