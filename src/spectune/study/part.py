"""What each study hands to the report: its tables, figures and the evidence the claims read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from spectune import _io


@dataclass
class Part:
    """One study's output. ``shown`` names the tables the HTML page displays (all are saved)."""

    name: str
    title: str
    intro: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    shown: list[str] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def save_tables(self, folder: Path) -> None:
        """Every table as parquet (types kept) and CSV (for a spreadsheet), written atomically."""
        for name, df in self.tables.items():
            _io.write_parquet(folder / f"{name}.parquet", df)
            _io.write_text(folder / f"{name}.csv", df.to_csv(index=False))
