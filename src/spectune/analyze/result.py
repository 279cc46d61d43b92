"""The outcome of an analysis: one row per matrix, summaries, and the spectra behind them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectune import _io

MARKER = "analysis.json"  # written last by save(): a folder without it holds an interrupted save
IDENTITY = ["name", "module_type", "layer_index", "rows", "cols", "numel", "dtype", "tied_to", "status", "note"]
SPECTRUM = [
    "n_evals",
    "numerical_rank",
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "top_eig_ratio",
    "effective_rank",
    "spectral_entropy",
    "log_norm",
    "log_spectral_norm",
    "condition_number",
    "svd_metric",
    "mean_singular_value",
]
TAIL = ["alpha_hill", "alpha", "alpha_xmin", "alpha_ks_distance", "alpha_weighted", "log_alpha_norm"]
# how far each alpha can be trusted (docs/metrics.md, "Uncertainty of alpha"): per fit its standard
# error, 95% interval, tail size, xmin and flags; under farms the windows' design effect
UNCERTAINTY = [
    "alpha_hill_se", "alpha_hill_lo", "alpha_hill_hi", "alpha_hill_n_tail", "alpha_hill_xmin", "alpha_hill_flags",
    "alpha_se", "alpha_lo", "alpha_hi", "alpha_n_tail", "alpha_flags", "alpha_design_effect",
]
# the alpha columns that carry intervals and flags, and their flag names
FITTED_ALPHAS = ("alpha_hill", "alpha")
FLAGS = ("degenerate", "outlier_dominated", "not_power_law")
# which spectrum the TAIL columns were fitted on (hill: the matrix's own; farms: pooled windows) and how
# their intervals were computed (asymptotic, bootstrap:B), on every row, so a table read alone says both
ESTIMATOR = ["alpha_estimator", "alpha_uncertainty"]
RMT = ["mp_sigma", "mp_bulk_max", "num_spikes", "mp_softrank", "snr", "rand_distance"]
CROSS = ["ce_metric", "cs_metric"]
COLUMNS = IDENTITY + SPECTRUM + TAIL + UNCERTAINTY + ESTIMATOR + RMT + CROSS
METRICS = SPECTRUM + TAIL + [c for c in UNCERTAINTY if not c.endswith("_flags")] + RMT + CROSS
# the metrics most people read first; summaries and plots use these
KEY_METRICS = [
    "stable_rank",
    "spectral_norm",
    "effective_rank",
    "alpha_hill",
    "alpha",
    "num_spikes",
    "snr",
    "svd_metric",
    "ce_metric",
    "cs_metric",
]
STATUSES = ("ok", "too_small", "nonfinite", "zero", "quantized", "unreadable")
FORMAT_VERSION = 1


@dataclass
class AnalysisResult:
    """Per-matrix metrics (``metrics``), their summaries, and the eigenvalues they came from."""

    metrics: pd.DataFrame
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], **kw: Any) -> AnalysisResult:
        df = pd.DataFrame(rows, columns=COLUMNS)
        df["layer_index"] = df["layer_index"].astype("Int64")
        for c in ("rows", "cols", "numel"):
            df[c] = df[c].astype("int64")
        for c in ("n_evals", "numerical_rank", "num_spikes", "alpha_hill_n_tail", "alpha_n_tail"):
            df[c] = df[c].astype("Float64").round().astype("Int64")
        return cls(metrics=df, **kw)

    # -- views ------------------------------------------------------------------------

    @property
    def ok(self) -> pd.DataFrame:
        """Rows whose fits are all defined."""
        return self.metrics[self.metrics["status"] == "ok"]

    def by_module_type(self) -> pd.DataFrame:
        """Mean of the key metrics per module type, over matrices with status ok."""
        return _grouped(self.ok, "module_type")

    def by_block(self) -> pd.DataFrame:
        """Mean of the key metrics per transformer block, over matrices with status ok."""
        ok = self.ok.dropna(subset=["layer_index"])
        return _grouped(ok, "layer_index")

    @property
    def alpha_estimator(self) -> str:
        """The estimator behind the alpha columns; analyses saved before it was recorded used hill."""
        col = self.metrics["alpha_estimator"] if "alpha_estimator" in self.metrics else None
        found = sorted({str(v) for v in col.dropna()}) if col is not None else []
        if len(found) > 1:
            raise ValueError(f"metrics table mixes alpha estimators {found}: analyze again with one")
        return found[0] if found else str(self.config.get("alpha_estimator", "hill"))

    @property
    def alpha_uncertainty(self) -> str:
        """How the alpha intervals were computed; analyses saved before intervals existed have none."""
        col = self.metrics["alpha_uncertainty"] if "alpha_uncertainty" in self.metrics else None
        found = sorted({str(v) for v in col.dropna()}) if col is not None else []
        return found[0] if len(found) == 1 else ",".join(found) or str(self.config.get("uncertainty", "none"))

    def flag_counts(self) -> dict[str, Any]:
        """Per fitted alpha column: how many ok matrices carry each flag, and of how many."""
        ok = self.ok
        out: dict[str, Any] = {}
        for col in FITTED_ALPHAS:
            if f"{col}_flags" not in ok:
                continue
            flags = ok[f"{col}_flags"].fillna("").astype(str).str.split(",")
            counts = {f: int(flags.map(lambda fs, f=f: f in fs).sum()) for f in FLAGS}
            out[col] = {"of": int(len(ok)), **counts, "any": int((ok[f"{col}_flags"].fillna("") != "").sum())}
        return out

    def distinguishable(self, column: str = "alpha_hill", z: float = 1.959963984540054) -> pd.DataFrame:
        """Per module type: how many matrices' ``column`` differ from their type's mean at 95%.

        For matrix i of a type with k >= 2 fitted matrices (status ok, finite alpha and se):
        m = the mean of the other k - 1 alphas, s_m = sqrt(sum of their se^2) / (k - 1), and
        i is distinguishable when |alpha_i - m| > z sqrt(se_i^2 + s_m^2) (a two-sided z-test
        of the difference, leaving i out of the mean it is compared with). Also per type:
        how many fits are flagged, and how many of those distinguishable are unflagged; the
        sample standard deviation of the alphas against their median se; and I^2 =
        max(0, (Q - (k - 1)) / Q), Cochran's Q over the fits with w = 1 / se^2 (Higgins &
        Thompson 2002): the share of the spread between matrices that their own
        uncertainty does not explain.
        """
        ok = self.ok
        rows = []
        for kind, g in ok.groupby("module_type", sort=True):
            a = pd.to_numeric(g[column], errors="coerce").to_numpy(float)
            se = pd.to_numeric(g.get(f"{column}_se"), errors="coerce").to_numpy(float)
            good = np.isfinite(a) & np.isfinite(se) & (se > 0)
            a, se = a[good], se[good]
            flags = g[f"{column}_flags"].fillna("").astype(str).to_numpy()[good] if f"{column}_flags" in g else np.full(len(a), "")
            k = len(a)
            if k < 2:
                continue
            other_mean = (a.sum() - a) / (k - 1)
            other_se = np.sqrt((se**2).sum() - se**2) / (k - 1)
            hit = np.abs(a - other_mean) > z * np.sqrt(se**2 + other_se**2)
            w = 1 / se**2
            q = float(np.sum(w * (a - np.sum(w * a) / np.sum(w)) ** 2))
            rows.append({"module_type": kind, "matrices": k, "flagged": int((flags != "").sum()),
                         "distinguishable": int(hit.sum()), "distinguishable_unflagged": int((hit & (flags == "")).sum()),
                         "sd": float(np.std(a, ddof=1)), "median_se": float(np.median(se)),
                         "i2": max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0})
        return pd.DataFrame(rows, columns=["module_type", "matrices", "flagged", "distinguishable",
                                           "distinguishable_unflagged", "sd", "median_se", "i2"])

    def digest(self) -> str:
        """Content hash of the metrics table; a plan records it to name the analysis it used."""
        csv = self.metrics.to_csv(index=False, float_format="%.10g")
        return hashlib.sha256(csv.encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        m = self.metrics
        ok = self.ok
        model: dict[str, Any] = {
            "source": self.source,
            "digest": self.digest(),
            "n_matrices": int(len(m)),
            "n_parameters": int(m["numel"].sum()),
            "status_counts": {s: int(n) for s, n in m["status"].value_counts().items()},
            "n_tied": int((m["tied_to"] != "").sum()),
            "alpha_estimator": self.alpha_estimator,
        }
        model["alpha_uncertainty"] = self.alpha_uncertainty
        model["alpha_flags"] = self.flag_counts()
        for c in KEY_METRICS + ["alpha_weighted", "log_norm", "log_spectral_norm", "rand_distance"]:
            vals = pd.to_numeric(ok[c], errors="coerce").astype(float)
            vals = vals[np.isfinite(vals)]
            model[f"mean_{c}"] = float(vals.mean()) if len(vals) else None
        return {
            "format_version": FORMAT_VERSION,
            "model": model,
            "by_module_type": _records(self.by_module_type()),
            "by_block": _records(self.by_block()),
            "config": self.config,
            "timings": self.timings,
        }

    # -- persistence ------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """metrics.parquet, metrics.csv, summary.json and spectra.npz, each written atomically, as one set.

        ``analysis.json`` marks a whole set: it is removed before the first file is
        replaced and written after the last, so a save killed half-way leaves a
        folder that ``load`` refuses instead of a mix of two analyses.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).unlink(missing_ok=True)
        _io.write_parquet(out / "metrics.parquet", self.metrics)
        with _io.atomic_path(out / "metrics.csv") as tmp:
            self.metrics.to_csv(tmp, index=False)
        _io.write_json(out / "summary.json", self.summary())
        with _io.atomic_path(out / "spectra.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **{_key(k): v for k, v in self.spectra.items()})
        _io.write_json(out / MARKER, {"source": self.source, "model_config": self.model_config})
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> AnalysisResult:
        """Read a saved analysis back (no pickles: parquet, JSON and a plain-array npz)."""
        out = Path(out_dir)
        path = out / "metrics.parquet"
        if not path.exists():
            raise FileNotFoundError(f"no saved analysis in {out} (metrics.parquet missing)")
        if not (out / MARKER).exists():
            raise FileNotFoundError(f"{out} holds an incomplete analysis ({MARKER} missing: a save was interrupted); "
                                    "run the analysis again")
        df = pd.read_parquet(path)
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        meta = json.loads((out / MARKER).read_text())
        spectra: dict[str, np.ndarray] = {}
        if (out / "spectra.npz").exists():
            with np.load(out / "spectra.npz", allow_pickle=False) as z:
                names = {_key(n): n for n in df["name"]}
                spectra = {names.get(k, k): z[k] for k in z.files}
        return cls(
            metrics=df,
            spectra=spectra,
            source=meta.get("source", summary.get("model", {}).get("source", "")),
            config=summary.get("config", {}),
            model_config=meta.get("model_config", {}),
            timings=summary.get("timings", {}),
        )


def _key(name: str) -> str:
    return name.replace("/", "|")


def _grouped(df: pd.DataFrame, by: str) -> pd.DataFrame:
    cols = [c for c in KEY_METRICS if c in df]
    if df.empty:
        return pd.DataFrame(columns=[by, "count", *cols])
    num = df[cols].apply(pd.to_numeric, errors="coerce").astype(float)
    num = num.replace([np.inf, -np.inf], np.nan)
    num[by] = df[by]
    g = num.groupby(by, sort=True)
    out = g.mean()
    out.insert(0, "count", g.size())
    return out.reset_index()


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return _io.to_jsonable(df.astype(object).where(df.notna(), None).to_dict(orient="records"))
