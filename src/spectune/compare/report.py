"""A comparison's tables and its self-contained HTML report (figures in compare/plots.py)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from spectune import _io
from spectune._html import gallery, page, table
from spectune.compare.config import CompareConfig, baseline_of
from spectune.compare.pareto import front_table, recommendations
from spectune.compare.plots import plot_curve, plot_search, task_figures
from spectune.compare.stats import bh_adjusted, paired, summarize, task_metrics, win_tie_loss

def findings(pairs: pd.DataFrame, summary: pd.DataFrame | None = None) -> list[str]:
    """One plain sentence per comparison, the same words whichever way the result goes.

    A plan whose mean rate scale is well below 1 trained with smaller steps than its
    baseline; the sentence says so, since that alone can explain a difference.
    """
    scale: dict[tuple[str, str], float] = {}
    if summary is not None and "mean_lr_scale" in summary:
        scale = {(r["task"], r["method"]): float(r["mean_lr_scale"]) for _, r in summary.iterrows()}
    out = []
    for _, r in pairs.iterrows():
        if r["verdict"] == "too few pairs":
            out.append(f"{r['task']}: {r['method']} vs {r['baseline']}: {r['pairs']} pair(s), too few for an interval.")
            continue
        what = {"better": "better than", "worse": "worse than", "no clear difference": "not distinguishable from"}[r["verdict"]]
        out.append(
            f"{r['task']}: {r['method']} is {what} {r['baseline']} on {r['metric']}: difference {r['diff']:+.4f} "
            f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] over {r['pairs']} seeds, paired t-test p={r['p_ttest']:.3g}, "
            f"wins/ties/losses {r['wins']}/{r['ties']}/{r['losses']}."
        )
        mine, theirs = scale.get((r["task"], r["method"]), 1.0), scale.get((r["task"], r["baseline"]), 1.0)
        if math.isfinite(mine) and math.isfinite(theirs) and mine < 0.9 * theirs:
            out[-1] += (f" Its plan's mean rate scale was {mine:.2f} (baseline {theirs:.2f}): part of the difference "
                        "may be the smaller overall step size rather than the per-layer pattern.")
    return out



def comparison_tables(df: pd.DataFrame, cfg: CompareConfig) -> dict[str, pd.DataFrame]:
    """The tables a report shows, from the tidy results."""
    summary = summarize(df, cfg.metric)
    pairs = paired(df, {m: baseline_of(cfg, m) for m in cfg.methods}, cfg.metric, cfg.tie_tolerance)
    return {"summary": summary, "paired": pairs, "win_tie_loss": win_tie_loss(pairs), "front": front_table(df, cfg.metric)}



def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> None:
    for name, t in tables.items():
        _io.write_text(out_dir / f"{name}.csv", t.to_csv(index=False))



def curve_table(pairs: pd.DataFrame, cfg: CompareConfig) -> pd.DataFrame:
    """The paired differences with the curve's x (``cfg.curve``'s value) and each task's family.

    ``p_adjusted_curve`` is Benjamini-Hochberg over every point of a method's curve: a curve
    asks one question at every (task, x) point, so the per-task ``p_adjusted`` under-corrects.
    """
    from spectune.compare.config import cell_data
    from spectune.compare.search import current_value

    if cfg.curve is None or pairs.empty:
        return pd.DataFrame()
    x, family = {}, {}
    for task in cfg.tasks:
        data = cell_data(cfg, task, str(cfg.baseline), cfg.seeds[0])
        x[task] = current_value(data, cfg.curve)
        family[task] = data["data"].get("name") or Path(str(data["data"].get("path"))).stem
    out = pairs.copy()
    out.insert(1, "x", out["task"].map(x))
    out.insert(1, "family", out["task"].map(family))
    out["p_adjusted_curve"] = out.groupby("method", sort=False)["p_ttest"].transform(bh_adjusted)
    return out.sort_values(["method", "family", "x"]).reset_index(drop=True)



def search_tables(search: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(chosen values per task x method, every trial with a ``chosen`` flag) from a SearchResult."""
    rows = []
    for task, methods in search.chosen.items():
        for method, c in methods.items():
            rows.append({"task": task, "method": method, **{k: v for k, v in c["values"].items()},
                         c["metric"]: c["value"], "trial": c["trial"]})
    chosen = pd.DataFrame(rows)
    trials = search.trials.copy()
    if not trials.empty:
        picked = {(r["task"], r["method"], r["trial"]) for r in rows}
        trials["chosen"] = [(a, b, int(c)) in picked for a, b, c in zip(trials["task"], trials["method"], trials["number"])]
    return chosen, trials



def _search_html(cfg: CompareConfig, search: Any, plots: Path) -> list[str]:
    esc = html.escape
    chosen, trials = search_tables(search)
    s = cfg.search
    body = ["<h2>Search</h2>",
            f"<p>Every searched method of a task had the same budget: {s.trials} trials, each trained on search seeds "
            f"{esc(str(s.seeds))} (never the final seeds) and scored on the validation split; sampler {s.sampler}, "
            f"pruner {s.pruner}. The test split was read only by the final cells, at the chosen values.</p>",
            "<h3>Chosen values</h3>", table(chosen)]
    if search.unfinished:
        body.append("<p>Still searching (no value chosen, so their final cells are not shown): "
                    + esc(", ".join(f"{t} / {m}" for t, m in search.unfinished)) + ".</p>")
    for task in cfg.tasks:
        path = plot_search(trials, task, plots / f"{task}_search.png") if not trials.empty else None
        if path is not None:
            body.append(gallery([(f"{task}: search", path)], "plot"))
    if not trials.empty:
        body += ["<h3>Every trial</h3>", table(trials)]
    return body



FRONT_COLUMNS = ["task", "method", "metric", "n", "mean", "ci_low", "ci_high", "memory_mb", "memory_ci_low",
                 "memory_ci_high", "time_s", "on_memory_front", "memory_dominated_by", "on_time_front", "beaten_by"]



def _front_html(front: pd.DataFrame, advice: list[str]) -> list[str]:
    if front.empty:
        return []
    esc = html.escape
    shown = front[[c for c in FRONT_COLUMNS if c in front]]
    return ["<h2>Quality against cost</h2>",
            "<p>A method is on the front when no method with lower or equal peak memory (within 5%) is significantly "
            "better: its paired 95% interval over matched seeds lies wholly on the good side of 0 (better within noise "
            "does not count). The recommendation within a budget is the least-memory method that nothing within the "
            "budget beats significantly.</p>",
            "<ul>" + "".join(f"<li>{esc(a)}</li>" for a in advice) + "</ul>",
            table(shown, row_class=["good" if f else "" for f in shown["on_memory_front"]])]



def write_report(df: pd.DataFrame, cfg: CompareConfig, out_dir: str | Path, command: str | None = None,
                 tables: dict[str, pd.DataFrame] | None = None, search: Any = None, advice: list[str] | None = None) -> Path:
    """Tables (CSV), plots (PNG) and ``report.html`` in ``out_dir``; returns the report's path.

    ``search`` (a SearchResult) adds the chosen values, the score-against-rate plots and the trial table;
    ``advice`` are the recommendation lines (default: one per task along the quality-memory front).
    """
    out = Path(out_dir)
    tables = tables if tables is not None else comparison_tables(df, cfg)
    if advice is None:
        advice = recommendations(tables["front"])
    write_tables(tables, out)
    summary, pairs = tables["summary"], tables["paired"]
    plots = out / "plots"
    esc = html.escape
    body: list[str] = [
        f"<p>{len(cfg.tasks)} task(s) x {len(cfg.methods)} method(s) x {len(cfg.seeds)} seed(s); "
        f"baseline <b>{esc(str(cfg.baseline))}</b>"
        + "".join(f", {esc(m)} against <b>{esc(b)}</b>" for m, b in cfg.pairs.items())
        + "; ranked by the test split's "
        f"{esc(cfg.metric if cfg.metric != 'auto' else 'accuracy (classification) / perplexity (LM)')}. "
        "Intervals are 95% Student-t intervals over seeds; differences are paired by seed "
        "(same seed = same training rows).</p>",
    ]
    if command:
        body.append(f"<p>Reproduce: <code>{esc(command)}</code></p>")
    done = int((df["status"] == "ok").sum()) if "status" in df else len(df)
    total = len(cfg.tasks) * len(cfg.methods) * len(cfg.seeds)
    if done < total:
        body.append(f"<p class=warn>{done} of {total} cells finished; the statistics use those.</p>")
    body += ["<h2>Findings</h2>", "<ul>" + "".join(f"<li>{esc(s)}</li>" for s in findings(pairs, summary)) + "</ul>"
             if not pairs.empty else "<p>No paired comparison yet.</p>"]
    body += _front_html(tables["front"], advice)
    if not pairs.empty:
        classes = ["good" if v == "better" else "bad" if v == "worse" else "" for v in pairs["verdict"]]
        body += ["<h2>Paired differences against the baseline</h2>",
                 "<p>diff = method - baseline; p_adjusted: Benjamini-Hochberg over the methods of a task; "
                 "wins/ties/losses count seeds.</p>",
                 table(pairs, row_class=classes),
                 "<h2>Wins, ties and losses over all tasks</h2>", table(tables["win_tie_loss"])]
    body += ["<h2>Mean and interval per method</h2>", table(summary)]
    for task in task_metrics(df, cfg.metric):
        figs = task_figures(df, tables, task, plots)
        body += [f"<h2>Task {esc(task)}</h2>", gallery([(f"{task}: {k}", p) for k, p in figs], "plot")]
    if search is not None and cfg.search is not None:
        body += _search_html(cfg, search, plots)
    curve = curve_table(pairs, cfg)
    if not curve.empty:
        _io.write_text(out / "curve.csv", curve.to_csv(index=False))
        body += [f"<h2>Paired difference against {esc(str(cfg.curve))}</h2>",
                 gallery([("curve", plot_curve(curve, str(cfg.curve), plots / "curve.png"))], "plot"), table(curve)]
    failed = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    if not failed.empty:
        body += ["<h2>Failed cells</h2>", table(failed[[c for c in ("task", "method", "seed", "error") if c in failed]])]
    body += ["<h2>Every cell</h2>", table(df)]
    return _io.write_text(out / "report.html", page(f"spectune comparison: {cfg.name}", body, subtitle=cfg.output_dir))
