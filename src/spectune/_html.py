"""Shared pieces of spectune's self-contained HTML reports (analysis, plan, comparison, studies).

A report is meant to be mailed, attached to a ticket or opened years later, so it
is one HTML file with its images inlined as base64 PNGs and its CSS inline: no
network, no JavaScript, nothing next to it that can go missing.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas rather than
through pyplot: nothing touches the global backend or pyplot's figure registry,
so plotting works headless and never leaks figures however many are drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spectune import _io

DPI = 90

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{margin-bottom:0}.source{color:#555;font-family:monospace;margin-top:.2em}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.scroll{overflow-x:auto;max-height:80vh}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}td:first-child{text-align:left}
tr.bad td{background:#fde2e2}.warn{color:#a00;font-weight:bold}
tr.good td{background:#e3f5e1}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #eee;padding:4px}figure img{display:block;max-width:100%}
figcaption{font-size:11px;color:#555;font-family:monospace;max-width:540px;overflow-wrap:anywhere}
""".strip()


def figure(size: tuple[float, float], right: float = 0.97, ncols: int = 1) -> tuple[Figure, Any]:
    """A pyplot-free figure with one axes (or ``ncols`` side by side) and fixed margins (no layout engine)."""
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    if ncols == 1:
        fig.subplots_adjust(left=0.12, right=right, bottom=0.13, top=0.92)
        return fig, fig.add_subplot()
    fig.subplots_adjust(left=0.12 / ncols ** 0.5, right=right, bottom=0.15, top=0.9, wspace=0.3)
    return fig, fig.subplots(1, ncols)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG atomically and release it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()  # not in pyplot's registry, so this is all "closing" needs
    return _io.write_bytes(path, buf.getvalue())


def page(title: str, body: Iterable[str], subtitle: str | None = None) -> str:
    """A whole HTML document: inline CSS, a heading, then the given body fragments."""
    esc = html.escape
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if subtitle:
        head.append(f"<p class=source>{esc(subtitle)}</p>")
    return "\n".join([*head, *body, "</body></html>"]) + "\n"


def gallery(items: list[tuple[str, Path]], kind: str) -> str:
    """Figures with captions, each PNG inlined as a data URI."""
    figs = []
    for caption, path in items:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        alt = html.escape(f"{kind}: {caption}", quote=True)
        figs.append(
            f'<figure><img class="{kind}" alt="{alt}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return '<div class="gallery">' + "".join(figs) + "</div>"


def table(df: pd.DataFrame, flag: bool = False, row_class: list[str] | None = None) -> str:
    """An HTML table with numbers at 4 significant digits.

    ``flag`` marks rows whose ``status`` is not ok; ``row_class`` gives each row a CSS
    class of its own (``good``, ``bad`` or empty).
    """
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, rec in enumerate(df.to_dict(orient="records")):
        cls = "bad" if flag and rec.get("status", "ok") != "ok" else (row_class[i] if row_class else "")
        attr = f' class="{cls}"' if cls else ""
        cells = "".join(f"<td>{html.escape(fmt(v))}</td>" for v in rec.values())
        body.append(f"<tr{attr}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def fmt(v: Any) -> str:
    """A cell's text: numbers at 4 significant digits, missing values empty."""
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
    return str(v)
