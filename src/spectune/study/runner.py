"""``run_study``: one named study (or all of them) from a study config, into a folder with a report.

Folder layout under the study root (``output_dir`` of the config, or ``out_dir``):

- ``grid/``: the natural grid's cells (shared by trajectories, layerwise, landscape);
- ``controlled/models/<dose>-<digest>/`` and ``controlled/grid-<digest>/``: transformed models and their cells,
  named after the transform settings that made them;
- ``<study>/``: ``report.html``, ``claims.csv``/``claims.md``, ``tables/*.parquet|csv``,
  ``figures/*.png``, ``study.yaml`` (the resolved config).

Every stage resumes: finished cells are skipped, transformed models and per-cell
measurements are cached, so re-running a study only redoes the tables and the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from spectune import _io
from spectune.study import claims as claims_mod
from spectune.study import controlled, layerwise, report, smoothness, trajectories
from spectune.study.config import StudyConfig, load_study_config
from spectune.study.part import Part

RunFn = Callable[[StudyConfig, Path, Path, bool], Part]
PARTS: dict[str, RunFn] = {
    "trajectories": trajectories.run,
    "controlled": controlled.run,
    "layerwise": layerwise.run,
    "landscape": smoothness.run,
}
STUDIES: dict[str, list[str]] = {**{k: [k] for k in PARTS}, "all": list(PARTS)}
RULE = ("Claim rule: each claim is one statistic with a {conf:.0%} interval (Spearman rho with a Fisher-z interval, "
        "a mean or paired difference with a t-interval, or a least-squares coefficient with its t-interval). Supported: the interval lies wholly "
        "on the claimed side of the null; not supported: wholly on the other side; inconclusive: it contains the null "
        "(or there are too few points). Claims of 'some difference' (!= 0) can only be supported or inconclusive.")


def run_study(name: str, config: str | Path | dict[str, Any], out_dir: str | Path | None = None,
              overrides: list[str] | None = None, progress: bool = True) -> Path:
    """Run study ``name`` (see ``STUDIES``) from a study config; returns the path of its report.html."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    cfg = load_study_config(config, overrides)
    root = Path(out_dir if out_dir is not None else cfg.output_dir)
    out = root / name
    (out / "figures").mkdir(parents=True, exist_ok=True)
    _io.write_text(out / "study.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    parts: list[Part] = []
    evidence: dict[str, Any] = {}
    for part_name in STUDIES[name]:
        part = PARTS[part_name](cfg, root, out, progress)
        part.save_tables(out / "tables")
        evidence.update(part.evidence)
        parts.append(part)
    table = claims_mod.evaluate(evidence, cfg, out / "figures")
    wanted = set(STUDIES[name])
    table = table[table["study"].isin(wanted)].reset_index(drop=True)
    _io.write_parquet(out / "claims.parquet", table)
    _io.write_text(out / "claims.csv", table.to_csv(index=False))
    rule = RULE.format(conf=cfg.claims.confidence)
    _io.write_text(out / "claims.md", f"# Claims: {cfg.name} ({name})\n\n{rule}\n\n" + claims_mod.to_markdown(table))
    return report.write(out / "report.html", f"spectune study {name}: {cfg.name}", f"study root {root}", table, parts, rule)
