"""The study's self-contained report: claims first, then each study's tables and figures."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from spectune import _html, _io
from spectune.study.part import Part

MAX_ROWS = 200  # a shown table longer than this is cut (the full one is in the parquet/CSV beside the report)


def write(path: Path, title: str, subtitle: str, claims: pd.DataFrame, parts: list[Part], rule: str) -> Path:
    body = ["<h2>Claims (seed 001)</h2>", f"<p>{html.escape(rule)}</p>"]
    cls = ["good" if v == "supported" else "bad" if v == "not supported" else "" for v in claims["verdict"]]
    body.append(_html.table(claims, row_class=cls))
    for part in parts:
        body.append(f"<h2>{html.escape(part.title)}</h2><p>{html.escape(part.intro)}</p>")
        for name in part.shown:
            df = part.tables.get(name)
            if df is None or df.empty:
                continue
            note = f" (first {MAX_ROWS} of {len(df)} rows; all in {name}.csv)" if len(df) > MAX_ROWS else f" ({name}.csv)"
            body.append(f"<h3>{html.escape(name)}{html.escape(note)}</h3>")
            body.append(_html.table(df.head(MAX_ROWS)))
        if part.figures:
            body.append(_html.gallery(part.figures, part.name))
    return _io.write_text(path, _html.page(title, body, subtitle))
