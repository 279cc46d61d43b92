"""``trajectories``: stable rank, top eigenvalue ratio and alpha of every matrix through fine-tuning.

The grid's cells (full and lightweight methods over seeds) run with the spectral tracker
every ``track_every_steps`` optimizer steps; each cell's ``spectral_trajectory.parquet``
(one row per matrix per tracked step, on the merged weights ``W + BA`` for adapters) is
read back into one tidy table. Values are also given relative to the matrix's value at
step 0 (``rel_<metric> = value / value_at_start``), so matrices of different sizes and
methods can be averaged on one axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from spectune.compare.config import CompareConfig, cell_config, cell_dir
from spectune.compare.grid import run_grid
from spectune.study import plots
from spectune.study.cells import BLOCK_TYPES, group_of
from spectune.study.config import StudyConfig
from spectune.study.part import Part

METRICS = ["stable_rank", "top_eig_ratio", "alpha_hill"]


def natural_grid(scfg: StudyConfig, root: Path, progress: bool) -> tuple[CompareConfig, pd.DataFrame]:
    """Run (or read back) the study's grid; cells live in ``root/grid`` and are shared by the studies."""
    ccfg = scfg.compare_config(root / "grid")
    results = run_grid(ccfg, progress=progress)
    kinds = {m: cell_config(ccfg, next(iter(ccfg.tasks)), m, ccfg.seeds[0]).method.kind for m in ccfg.methods}
    results["regime"] = results["method"].map(lambda m: "full" if kinds[m] == "full" else "light")
    return ccfg, results


def load(ccfg: CompareConfig, results: pd.DataFrame) -> pd.DataFrame:
    """Every ok cell's trajectory with its task/method/seed, progress in [0, 1] and values relative to step 0."""
    frames = []
    for rec in results[results["status"] == "ok"].to_dict(orient="records"):
        path = cell_dir(ccfg, rec["task"], rec["method"], int(rec["seed"])) / "spectral_trajectory.parquet"
        if not path.exists():
            continue
        df = pd.read_parquet(path)
        df = df.drop_duplicates(["step", "name"], keep="last")
        for k in ("task", "method", "regime"):
            df[k] = rec[k]
        df["seed"] = int(rec["seed"])
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    traj = pd.concat(frames, ignore_index=True)
    traj["layer_index"] = traj["layer_index"].astype("Int64")
    traj["group"] = traj["module_type"].map(group_of)
    last = traj.groupby(["task", "method", "seed"])["step"].transform("max")
    traj["progress"] = traj["step"] / last.where(last > 0, 1)
    key = ["task", "method", "seed", "name"]
    first = traj.sort_values("step").groupby(key).first()
    for m in METRICS:
        if m in traj:
            start = traj.join(first[m].rename("_start"), on=key)["_start"]
            traj[f"rel_{m}"] = traj[m] / start
    return traj


def by_type(traj: pd.DataFrame) -> pd.DataFrame:
    """Mean relative metric per method, module type and tracked step (averaged over seeds and layers)."""
    cols = [f"rel_{m}" for m in METRICS if f"rel_{m}" in traj]
    return (traj.groupby(["task", "method", "regime", "module_type", "step"], as_index=False)
            .agg(progress=("progress", "mean"), **{c: (c, "mean") for c in cols}))


def changes(traj: pd.DataFrame) -> pd.DataFrame:
    """Per cell and matrix: start and end values of each metric and the relative change end/start - 1."""
    key = ["task", "method", "regime", "seed", "name", "module_type", "group", "layer_index"]
    t = traj.sort_values("step")
    g = t.groupby(key, dropna=False)
    out = g[METRICS].first().add_suffix("_start").join(g[METRICS].last().add_suffix("_end")).reset_index()
    for m in METRICS:
        out[f"change_{m}"] = out[f"{m}_end"] / out[f"{m}_start"] - 1
    return out


def by_depth(ch: pd.DataFrame) -> pd.DataFrame:
    """Mean relative change per method, group (attention/FFN) and block index, with the seeds' spread."""
    blocks = ch[ch["module_type"].isin(BLOCK_TYPES) & ch["layer_index"].notna()]
    cols = [f"change_{m}" for m in METRICS]
    per_seed = blocks.groupby(["task", "method", "regime", "group", "layer_index", "seed"], as_index=False)[cols].mean()
    out = per_seed.groupby(["task", "method", "regime", "group", "layer_index"], as_index=False)[cols].agg(["mean", "std"])
    out.columns = ["_".join(c).rstrip("_") if isinstance(c, tuple) else c for c in out.columns]
    return out.rename(columns={f"{c}_mean": c for c in cols})


def lr_share(kind: str, warmup_ratio: float, fraction: float, points: int = 10001) -> float:
    """Share of the learning-rate integral spent in the first ``fraction`` of training.

    The null for the "early phase" claim: with a decaying schedule the weights move more
    early on for that reason alone (linear decay, no warm-up: 1 - (1 - 1/3)^2 = 5/9 of
    the rate is spent in the first third).
    """
    t = np.linspace(0.0, 1.0, points)
    w = warmup_ratio
    ramp = np.where(t < w, t / w if w > 0 else 1.0, 1.0)
    after = np.clip((t - w) / (1 - w), 0, 1) if w < 1 else np.zeros_like(t)
    if kind == "linear":
        decay = 1 - after
    elif kind == "cosine":
        decay = 0.5 * (1 + np.cos(math.pi * after))
    else:
        decay = np.ones_like(t)
    lr = np.where(t < w, ramp, decay)
    cum = np.concatenate([[0.0], np.cumsum((lr[1:] + lr[:-1]) / 2 * np.diff(t))])
    return float(np.interp(fraction, t, cum) / cum[-1])


def early_share(traj: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """Per cell: the share of the stable-rank path length (sum over block matrices of |dSR| between
    tracked points) covered by ``fraction`` of the steps (interpolated between points)."""
    rows = []
    blocks = traj[traj["module_type"].isin(BLOCK_TYPES)]
    for (task, method, regime, seed), g in blocks.groupby(["task", "method", "regime", "seed"]):
        piv = g.pivot_table(index="progress", columns="name", values="stable_rank").sort_index()
        if len(piv) < 3:
            continue
        steps = piv.diff().abs().sum(axis=1).to_numpy()[1:]
        cum = np.concatenate([[0.0], np.cumsum(steps)])
        total = cum[-1]
        if total <= 0:
            continue
        rows.append({"task": task, "method": method, "regime": regime, "seed": seed,
                     "early_share": float(np.interp(fraction, piv.index.to_numpy(), cum) / total),
                     "path_length": float(total), "points": len(piv)})
    return pd.DataFrame(rows)


def run(scfg: StudyConfig, root: Path, out: Path, progress: bool) -> Part:
    ccfg, results = natural_grid(scfg, root, progress)
    traj = load(ccfg, results)
    part = Part("trajectories", "Spectral trajectories through fine-tuning",
                "Every matrix's stable rank, top eigenvalue ratio (s1^2 / sum s^2) and Hill alpha, tracked every "
                f"{scfg.track_every_steps} steps (and at each epoch end) on the merged weights, relative to the "
                "value at step 0; lines are means over seeds and over the blocks of a module type.")
    part.tables["results"] = results
    part.evidence.update(results=results, compare=ccfg)
    if traj.empty:
        part.intro += " No trajectories were recorded (every cell failed)."
        part.shown = ["results"]
        return part
    bt, ch = by_type(traj), changes(traj)
    depth = by_depth(ch)
    tcfg = cell_config(ccfg, next(iter(ccfg.tasks)), next(iter(ccfg.methods)), ccfg.seeds[0])
    share = early_share(traj, scfg.claims.early_fraction)
    null = lr_share(tcfg.train.scheduler, tcfg.train.warmup_ratio, scfg.claims.early_fraction)
    if not share.empty:
        share["lr_share"] = null
    part.tables.update(trajectory=traj, trajectory_by_type=bt, matrix_changes=ch, changes_by_depth=depth,
                       early_share=share)
    part.shown = ["changes_by_depth", "early_share"]
    part.evidence.update(trajectory=traj, changes=ch, early_share=share, lr_share=null)
    figs = out / "figures"
    for m in METRICS:
        col = f"rel_{m}"
        if col not in bt:
            continue
        for method, g in bt.groupby("method", sort=False):
            p = plots.lines(g, "progress", col, "module_type", figs / f"trajectory-{m}-{method}.png",
                            f"{m} relative to start: {method}", "share of training steps", f"{m} / {m}(step 0)",
                            hline=1.0)
            part.figures.append((f"{m} by module type, {method}", p))
        d = depth.copy()
        d["series"] = d["method"] + " " + d["group"]
        p = plots.lines(d, "layer_index", f"change_{m}", "series", figs / f"depth-{m}.png",
                        f"relative change of {m}, start to end, by block", "block index", f"{m} end / start - 1",
                        hline=0.0)
        part.figures.append((f"{m} change by depth", p))
    return part
