"""``controlled``: change the eigenvalue ratio of chosen matrices, hold everything else, fine-tune, measure.

For each arm (a set of module types, e.g. attention or feed-forward) and dose (a factor
on the top-k singular values, the 2-norm of the spectrum restored: see
``spectune.study.transform``) the base model's matching matrices are transformed and
the model is saved as a Hugging Face folder under ``<root>/controlled/models/`` (cached:
a folder whose recorded settings match is reused). Dose 1.0 is the control: the same
load-and-save round trip with no change, shared by every arm. Each dose is then one
"method" of a comparison grid (the study's chosen training method with ``model.name``
pointing at the folder) over the seeds, so doses see the same data, schedule and seeds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from spectune import _io
from spectune.analyze.naming import layer_index, module_type
from spectune.compare.config import CompareConfig, cell_config, merge
from spectune.compare.grid import run_grid
from spectune.study import plots
from spectune.study.config import StudyConfig
from spectune.study.part import Part
from spectune.study.stats import t_interval
from spectune.study.transform import rescale_top_singular_values, stable_rank, top_eig_ratio

SETTINGS = "spectune_transform.json"
CONTROL = "control"


def dose_name(arm: str, dose: float) -> str:
    return CONTROL if dose == 1 else f"{arm}-x{dose:g}"


def transform_model(source: str, dest: Path, types: list[str], layers: list[int] | None, factor: float,
                    k: int) -> pd.DataFrame:
    """Save ``source`` with the matching matrices transformed into ``dest``; return the per-matrix log.

    The log has each matrix's stable rank, top eigenvalue ratio and Frobenius norm before
    and after, so the dose actually given is on record. Cached: ``dest`` is reused when its
    recorded settings equal these.
    """
    settings = transform_settings(source, types, layers, factor, k)
    log_path = dest / "spectune_transform_log.parquet"
    if (dest / SETTINGS).exists() and log_path.exists() and json.loads((dest / SETTINGS).read_text()) == settings:
        return pd.read_parquet(log_path)
    from transformers import AutoModel, AutoTokenizer

    from spectune.analyze.builtin import model_path

    path = model_path(source)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    rows = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2 or module_type(name) not in types:
                continue
            li = layer_index(name)
            if layers is not None and li not in layers:
                continue
            new = rescale_top_singular_values(p, factor, k)
            s0, s1 = torch.linalg.svdvals(p.double()), torch.linalg.svdvals(new.double())
            rows.append({"name": name, "module_type": module_type(name), "layer_index": li,
                         "stable_rank_before": stable_rank(s0), "stable_rank_after": stable_rank(s1),
                         "top_eig_ratio_before": top_eig_ratio(s0), "top_eig_ratio_after": top_eig_ratio(s1),
                         "fro_before": float(s0.norm()), "fro_after": float(s1.norm())})
            p.copy_(new)
    if not rows:
        raise ValueError(f"no matrix of types {types} (layers {layers}) in {source}")
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(dest)
    log = pd.DataFrame(rows)
    _io.write_parquet(log_path, log)
    _io.write_json(dest / SETTINGS, settings)  # last: its presence marks a complete folder
    return log


def doses(scfg: StudyConfig) -> list[tuple[str, str, float]]:
    """(method name, arm, dose) for every dose of every arm; the control once, under arm ``control``."""
    c = scfg.controlled
    out = [(CONTROL, CONTROL, 1.0)] if 1.0 in c.doses else []
    out += [(dose_name(arm, d), arm, d) for arm in c.arms for d in c.doses if d != 1]
    return out


def digest(settings: dict[str, Any]) -> str:
    """A short, stable name for a set of transform settings (it goes into folder names)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def build(scfg: StudyConfig, root: Path) -> tuple[CompareConfig, pd.DataFrame]:
    """The transformed model folders and the comparison grid that fine-tunes each of them.

    Every transform setting is part of the identity of what it produces: a model folder
    is named after its own settings' digest, and the grid folder after the digest of the
    study's transform settings, so a re-run with another ``top_k``, ``layers`` or arm
    trains new cells instead of pairing new doses with old scores (and switching back
    reuses the old ones).
    """
    c = scfg.controlled
    method = c.method or next(iter(scfg.grid.methods))
    probe = scfg.compare_config(root / "grid")
    source = cell_config(probe, next(iter(probe.tasks)), method, probe.seeds[0]).model.name
    base = (root / "controlled").resolve()
    models = base / "models"
    logs, methods = [], {}
    for mname, arm, dose in doses(scfg):
        types = [t for a in c.arms.values() for t in a] if arm == CONTROL else c.arms[arm]
        folder = (models / f"{mname}-{digest(transform_settings(source, types, c.layers, dose, c.top_k))}").resolve()
        if models not in folder.parents:
            raise ValueError(f"arm {arm!r}: its model folder {folder} would lie outside {models}")
        log = transform_model(source, folder, types, c.layers, dose, c.top_k)
        log["method"], log["arm"], log["dose"] = mname, arm, dose
        logs.append(log)
        methods[mname] = merge(scfg.grid.methods[method], {"model": {"name": str(folder)}})
    study = {"source": source, "arms": {a: sorted(t) for a, t in c.arms.items()}, "layers": c.layers, "top_k": c.top_k}
    ccfg = scfg.compare_config(root / "controlled" / f"grid-{digest(study)}", methods=methods, seeds=c.seeds)
    return ccfg, pd.concat(logs, ignore_index=True)


def transform_settings(source: str, types: list[str], layers: list[int] | None, factor: float, k: int) -> dict[str, Any]:
    return {"source": source, "types": sorted(types), "layers": layers, "factor": factor, "top_k": k}


def metric_name(results: pd.DataFrame, ccfg: CompareConfig) -> str:
    if ccfg.metric != "auto":
        return f"test_{ccfg.metric}"
    return "test_accuracy" if "test_accuracy" in results else "test_perplexity"


def dose_table(results: pd.DataFrame, log: pd.DataFrame, metric: str, gap: str, arms: list[str],
               confidence: float) -> pd.DataFrame:
    """Per task, arm and dose: mean and t-interval of the test metric and the gap; the dose given."""
    ok = results[results["status"] == "ok"]
    rows = []
    for arm in arms:
        arm_methods = log[(log["arm"] == arm) | (log["arm"] == CONTROL)][["method", "dose"]].drop_duplicates()
        for task in ok["task"].unique():
            for rec in arm_methods.to_dict(orient="records"):
                cells = ok[(ok["task"] == task) & (ok["method"] == rec["method"])]
                given = log[(log["method"] == rec["method"]) & ((log["arm"] == arm) | (log["arm"] == CONTROL))]
                if rec["method"] == CONTROL:
                    types = set(log[log["arm"] == arm]["module_type"])
                    given = given[given["module_type"].isin(types)]
                row: dict[str, Any] = {"task": task, "arm": arm, "dose": rec["dose"], "method": rec["method"],
                                       "stable_rank_after": given["stable_rank_after"].mean(),
                                       "top_eig_ratio_after": given["top_eig_ratio_after"].mean()}
                for col, label in ((metric, "metric"), (gap, "gap")):
                    if col in cells:
                        e = t_interval(cells[col].to_numpy(), confidence)
                        row.update({f"{label}_mean": e.value, f"{label}_lo": e.lo, f"{label}_hi": e.hi, "n": e.n})
                rows.append(row)
    return pd.DataFrame(rows).sort_values(["task", "arm", "dose"]).reset_index(drop=True)


def run(scfg: StudyConfig, root: Path, out: Path, progress: bool) -> Part:
    ccfg, log = build(scfg, root)
    results = run_grid(ccfg, progress=progress)
    dose_of = log.drop_duplicates("method").set_index("method")
    results["arm"] = results["method"].map(dose_of["arm"])
    results["dose"] = results["method"].map(dose_of["dose"])
    metric, gap = metric_name(results, ccfg), scfg.claims.gap
    arms = list(scfg.controlled.arms)
    table = dose_table(results, log, metric, gap, arms, scfg.claims.confidence)
    c = scfg.controlled
    part = Part("controlled", "Controlled eigenvalue ratios: dose-response",
                f"The top {c.top_k} singular value(s) of every matrix of an arm were multiplied by the dose and the "
                "spectrum rescaled to its original 2-norm (same singular vectors, same Frobenius norm); each "
                f"transformed model was fine-tuned with method '{c.method or next(iter(scfg.grid.methods))}' over "
                f"seeds {ccfg.seeds}. Dose 1 is the unmodified control (shared by every arm). Test metric: {metric}; "
                f"gap: {gap}; intervals: mean and {scfg.claims.confidence:.0%} t-interval over seeds.")
    part.tables.update(controlled_results=results, transform_log=log, dose_response=table)
    part.shown = ["dose_response"]
    part.evidence.update(controlled=results, dose_response=table, controlled_metric=metric, transform_log=log)
    figs = out / "figures"
    ok = results[results["status"] == "ok"]
    pts = []
    for arm in arms:  # the control's cells are drawn in every arm
        p = ok[(ok["arm"] == arm) | (ok["arm"] == CONTROL)].copy()
        p["arm"] = arm
        pts.append(p)
    points = pd.concat(pts, ignore_index=True) if pts else ok
    for col, label in (("metric", metric), ("gap", gap)):
        if f"{col}_mean" not in table:
            continue
        p = plots.errorbars(table, "dose", f"{col}_mean", f"{col}_lo", f"{col}_hi", "arm",
                            figs / f"controlled-{col}.png", f"{label} vs dose (mean, {scfg.claims.confidence:.0%} t-interval)",
                            "dose: factor on the top singular value(s)", label, points=points, py=label, logx=True)
        part.figures.append((f"dose-response: {label}", p))
    return part
