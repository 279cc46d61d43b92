"""Plots and the self-contained HTML report of a comparison."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectune import _io
from spectune._html import figure, gallery, page, save_png, table
from spectune.compare.config import CompareConfig, baseline_of
from spectune.compare.pareto import fmt_mb, front_table, plot_front, recommendations
from spectune.compare.stats import bh_adjusted, higher_is_better, paired, summarize, task_metrics, win_tie_loss

COLORS = {"better": "#2a7d2a", "worse": "#b22222", "no clear difference": "#555555", "too few pairs": "#999999"}


def _rows_figure(n: int) -> tuple[Any, Any]:
    """A figure with one row per method; margins fixed in inches so titles and labels fit at any height."""
    h = 0.45 * max(n, 1) + 1.4
    fig, ax = figure((6.4, h), right=0.97)
    fig.subplots_adjust(left=0.3, bottom=0.6 / h, top=1 - 0.4 / h)
    return fig, ax


def plot_scores(df: pd.DataFrame, summary: pd.DataFrame, task: str, path: Path) -> Path:
    """Each method's per-seed scores (dots) and mean with its 95% interval (bar), one row per method."""
    s = summary[summary["task"] == task]
    col = s["metric"].iloc[0]
    fig, ax = _rows_figure(len(s))
    y = np.arange(len(s))[::-1]
    for yi, (_, r) in zip(y, s.iterrows()):
        pts = df[(df["task"] == task) & (df["method"] == r["method"]) & (df["status"] == "ok")][col].dropna()
        ax.scatter(pts, np.full(len(pts), yi), s=14, color="#9ab", zorder=2)
        if math.isfinite(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color="#234", lw=2, zorder=3)
        ax.scatter([r["mean"]], [yi], marker="D", s=30, color="#234", zorder=4)
    ax.set_yticks(y, list(s["method"]))
    ax.set_ylim(-0.6, len(s) - 0.4)
    ax.set_xlabel(f"{col} ({'higher' if higher_is_better(col) else 'lower'} is better)")
    ax.set_title(f"{task}: mean and 95% interval over seeds")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def plot_differences(pairs: pd.DataFrame, task: str, path: Path) -> Path:
    """Paired difference to the baseline with its interval; colour says which way the interval points."""
    p = pairs[pairs["task"] == task]
    fig, ax = _rows_figure(len(p))
    y = np.arange(len(p))[::-1]
    for yi, (_, r) in zip(y, p.iterrows()):
        c = COLORS.get(r["verdict"], "#555")
        if math.isfinite(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color=c, lw=2)
        ax.scatter([r["diff"]], [yi], marker="D", s=30, color=c, zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_ylim(-0.6, len(p) - 0.4)
    bases = list(dict.fromkeys(p["baseline"]))
    ax.set_yticks(y, [m if len(bases) == 1 else f"{m}\nvs {b}" for m, b in zip(p["method"], p["baseline"])])
    ax.set_xlabel(f"{p['metric'].iloc[0]}: method - baseline")
    ax.set_title(f"{task}: paired difference to {' / '.join(bases)} (95% interval)")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def plot_cost(summary: pd.DataFrame, task: str, path: Path) -> Path:
    """Score against trainable parameters: what each method buys with its budget."""
    s = summary[(summary["task"] == task) & (summary["trainable_parameters"] > 0)]
    fig, ax = figure((6.4, 4.0), right=0.97)
    ax.errorbar(s["trainable_parameters"], s["mean"], yerr=[s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]],
                fmt="o", color="#234", ecolor="#9ab", capsize=3)
    for _, r in s.iterrows():
        ax.annotate(str(r["method"]), (r["trainable_parameters"], r["mean"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(s["metric"].iloc[0] if len(s) else "")
    ax.set_title(f"{task}: score against trainable parameters")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_gap(summary: pd.DataFrame, task: str, path: Path) -> Path:
    """Generalization gap (train minus test accuracy; test minus train loss for LM) per method."""
    s = summary[(summary["task"] == task) & summary["gap"].notna()]
    fig, ax = _rows_figure(len(s))
    y = np.arange(len(s))[::-1]
    ax.barh(y, s["gap"], color="#9ab")
    ax.set_yticks(y, list(s["method"]))
    ax.set_xlabel(s["gap_metric"].iloc[0] if len(s) else "gap")
    ax.set_title(f"{task}: generalization gap (mean over seeds)")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


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


def plot_search(trials: pd.DataFrame, task: str, path: Path) -> Path | None:
    """Validation score of every trial against its learning rate, one colour per method, chosen ones ringed."""
    t = trials[(trials["task"] == task) & trials["state"].isin(["COMPLETE", "PRUNED"])]
    if t.empty or "param:train.lr" not in t:
        return None
    fig, ax = figure((6.4, 3.8), right=0.72)
    for i, (method, g) in enumerate(t.groupby("method", sort=False)):
        color = f"C{i % 10}"
        done = g[g["state"] == "COMPLETE"]
        ax.scatter(done["param:train.lr"], done["value"], color=color, s=22, label=method)
        cut = g[g["state"] == "PRUNED"]
        if not cut.empty:
            ax.scatter(cut["param:train.lr"], cut["value"], facecolors="none", edgecolors=color, s=22)
        if "chosen" in g and g["chosen"].any():
            best = g[g["chosen"]]
            ax.scatter(best["param:train.lr"], best["value"], s=110, facecolors="none", edgecolors="k", lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate (train.lr)")
    ax.set_ylabel("validation score (mean over search seeds)")
    ax.set_title(f"{task}: search trials (hollow: pruned, ringed: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return save_png(fig, path)


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


def plot_curve(curve: pd.DataFrame, what: str, path: Path) -> Path:
    """Paired difference (method - its baseline) against the curve's x, one panel per method, a line per family."""
    methods = list(dict.fromkeys(curve["method"]))
    fig, axes = figure((4.2 * len(methods), 3.4), ncols=len(methods), right=0.98)
    axes = np.atleast_1d(axes)
    for ax, method in zip(axes, methods):
        m = curve[curve["method"] == method]
        for i, (fam, g) in enumerate(m.groupby("family", sort=True)):
            c = f"C{i % 10}"
            ok = g["ci_low"].notna()
            ax.errorbar(g["x"][ok], g["diff"][ok], yerr=[g["diff"][ok] - g["ci_low"][ok], g["ci_high"][ok] - g["diff"][ok]],
                        color=c, marker="o", capsize=3, label=fam)
            ax.plot(g["x"], g["diff"], color=c, alpha=0.4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(m["x"])), [str(v) for v in sorted(set(m["x"]))])
        ax.set_xlabel(what)
        ax.set_title(f"{method} vs {m['baseline'].iloc[0]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel("paired difference (95% interval)")
    return save_png(fig, path)


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


def task_figures(df: pd.DataFrame, tables: dict[str, pd.DataFrame], task: str, plots: Path) -> list[tuple[str, Path]]:
    """A task's figures: scores, differences, quality against memory and time, trainable parameters, gap."""
    summary, pairs, front = tables["summary"], tables["paired"], tables.get("front", pd.DataFrame())
    figs = [("scores", plot_scores(df, summary, task, plots / f"{task}_scores.png"))]
    if not pairs.empty and (pairs["task"] == task).any():
        figs.append(("differences", plot_differences(pairs, task, plots / f"{task}_differences.png")))
    mine = front[front["task"] == task] if not front.empty else front
    for kind, cost in (("memory", "memory_mb"), ("time", "time_s")):
        if not mine.empty and np.isfinite(mine[cost].astype(float)).any():
            figs.append((kind, plot_front(front, task, kind, plots / f"{task}_{kind}.png")))
    if (summary[summary["task"] == task]["trainable_parameters"] > 0).any():
        figs.append(("cost", plot_cost(summary, task, plots / f"{task}_cost.png")))
    if summary[summary["task"] == task]["gap"].notna().any():
        figs.append(("gap", plot_gap(summary, task, plots / f"{task}_gap.png")))
    return figs


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


def _count(n: float) -> str:
    if not math.isfinite(n):
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def _trainable(r: pd.Series) -> str:
    """What a method trains: "35.4M of 134.5M" where it trains a subset at a time (LISA), else the count."""
    total, active = r["trainable_parameters"], r.get("trainable_parameters_active", math.nan)
    if math.isfinite(active) and math.isfinite(total) and active < total:
        return f"{_count(active)} of {_count(total)}"
    return _count(total)


# the printed table's columns, most wanted first: a narrow terminal loses them from the end of this list; the task
# and the mean (the number a reader came for) are never cut, the method is never dropped (it wraps when it must);
# the report and summary.csv keep every column
CONSOLE_PRIORITY = ["task", "mean", "method", "95% CI", "difference [95% CI]", "verdict", "peak mem", "front", "vs", "n",
                    "s/step", "p", "w/t/l", "trainable", "time_s", "optim state", "lr scale"]
NEVER_CUT = ("task", "mean")
NEVER_DROPPED = NEVER_CUT + ("method",)


def fit_columns(rows: pd.DataFrame, width: int, padding: int = 3) -> list[str]:
    """The columns of ``rows`` that fit in ``width`` characters, in the table's order, dropping the least wanted first.

    A column needs its longest cell (or header) plus ``padding`` (rich's table: a space either
    side and a rule); ``task``, ``mean`` and ``method`` are kept whatever the width.
    """
    need = {c: max([len(str(c))] + [len(str(v)) for v in rows[c]]) + padding for c in rows}
    keep = [c for c in CONSOLE_PRIORITY if c in need] + [c for c in need if c not in CONSOLE_PRIORITY]
    while sum(need[c] for c in keep) + 1 > width and any(c not in NEVER_DROPPED for c in keep):
        keep.remove(next(c for c in reversed(keep) if c not in NEVER_DROPPED))
    return [c for c in rows if c in keep]


def console_rows(summary: pd.DataFrame, pairs: pd.DataFrame, front: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """The printed results table: a row per task and method with its interval, its paired verdict and its costs
    (peak memory: the CUDA peak where recorded, else resident; ``front``: on the quality-memory front)."""
    rows = []
    on_front = {(r["task"], r["method"]): bool(r["on_memory_front"]) for _, r in front.iterrows()} \
        if front is not None and not front.empty else {}
    for _, r in summary.iterrows():
        p = pairs[(pairs["task"] == r["task"]) & (pairs["method"] == r["method"])] if not pairs.empty else pairs
        gpu = r.get("peak_gpu_memory_mb", math.nan)
        rows.append({
            "task": r["task"], "method": r["method"], "n": r["n"], "mean": f"{r['mean']:.3f}",
            "95% CI": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if math.isfinite(r["ci_low"]) else "-",
            "vs": p["baseline"].iloc[0] if len(p) else "(baseline)",
            "difference [95% CI]": (f"{p['diff'].iloc[0]:+.3f} [{p['ci_low'].iloc[0]:+.3f}, {p['ci_high'].iloc[0]:+.3f}]"
                                    if len(p) and math.isfinite(p["ci_low"].iloc[0]) else "-"),
            "p": f"{p['p_ttest'].iloc[0]:.2g}" if len(p) and math.isfinite(p["p_ttest"].iloc[0]) else "-",
            "w/t/l": f"{p['wins'].iloc[0]}/{p['ties'].iloc[0]}/{p['losses'].iloc[0]}" if len(p) else "",
            "verdict": p["verdict"].iloc[0] if len(p) else "",
            "lr scale": f"{r.get('mean_lr_scale', math.nan):.2f}", "trainable": _trainable(r),
            "optim state": _count(r.get("optimizer_state_parameters", math.nan)),
            "peak mem": fmt_mb(gpu if math.isfinite(gpu) else r.get("peak_memory_mb", math.nan)),
            "s/step": f"{r['seconds_per_step']:.3g}" if math.isfinite(r.get("seconds_per_step", math.nan)) else "-",
            "time_s": f"{r['wall_time_s']:.0f}",
            "front": {True: "yes", False: "no"}.get(on_front.get((r["task"], r["method"])), ""),  # type: ignore[call-overload]
        })
    return rows
