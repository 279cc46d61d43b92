"""A plan as a web page: the per-layer decision table and the decisions against depth."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from spectune import _io
from spectune._html import gallery, page, table as html_table
from spectune.analyze.report import plot_depth
from spectune.analyze.result import AnalysisResult
from spectune.plan.build import plan_table
from spectune.plan.schema import Plan


def write_plan_report(plan: Plan, analysis: AnalysisResult, path: str | Path) -> Path:
    """Self-contained HTML next to the plan file: what each matrix gets and why."""
    path = Path(path)
    table = plan_table(plan, analysis)
    plots_dir = path.parent / f"{path.stem}_plots"
    figs = []
    drawable = table.assign(status="ok", lora_rank=pd.to_numeric(table["lora_rank"], errors="coerce"))
    for col in ("lr_scale", "wd_scale", "lora_rank"):
        if drawable[col].notna().any() and drawable[col].nunique() > 1:
            figs.append((col, plot_depth(drawable, col, plots_dir / f"{col}.png")))
    esc = html.escape
    params = ", ".join(f"{k}={v}" for k, v in plan.params.items())
    decay = (f"; weight-decay multiplier bounds [{plan.wd_min_scale}, {plan.wd_max_scale}]"
             if plan.wd_scale and set(plan.wd_scale.values()) != {1.0} else "; weight decay: base value everywhere")
    parts = [
        f"<p>parameters: {esc(params) or '(defaults)'}; scale bounds [{plan.min_scale}, {plan.max_scale}]"
        f"{esc(decay)}; alpha estimator of the analysis: {esc(plan.alpha_estimator)}</p>",
        "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in plan.notes) + "</ul>",
    ]
    if plan.excluded:
        parts.append(
            f"<p class=warn>{len(plan.excluded)} matrices keep the base rate because their metric is missing:</p>"
            + "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in plan.excluded) + "</ul>"
        )
    parts += [
        "<h2>Decisions by depth</h2>",
        gallery(figs, "depth") if figs else "<p>All matrices get the same decision.</p>",
        "<h2>Per-matrix decisions</h2>",
        html_table(table),
    ]
    doc = page(f"spectune plan: {plan.policy}", parts, subtitle=f"{plan.model} (analysis {plan.analysis_digest})")
    return _io.write_text(path, doc)
