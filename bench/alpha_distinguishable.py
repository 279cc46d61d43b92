"""Can a per-matrix plan carry information beyond module type? Alphas against their type's mean, with intervals.

For each packaged model (MiniLM, SmolLM2-135M, Gemma-3-270M), under each alpha estimator
(hill, farms) and for each fitted alpha column (alpha_hill: median xmin; alpha: KS-scanned
xmin), ``AnalysisResult.distinguishable`` counts per module type how many matrices' alphas
differ from the mean of the other matrices of their type at 95% (asymptotic intervals,
docs/metrics.md "Uncertainty of alpha"), how many fits are flagged, and I^2, the share of
the between-matrix spread their own uncertainty does not explain.

Usage:
  .venv/bin/python bench/alpha_distinguishable.py                    # all three models (~10 min on 2 busy cores)
  .venv/bin/python bench/alpha_distinguishable.py --models minilm
Results: bench/results/alpha_distinguishable.json and a markdown table on stdout (docs/metrics.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("minilm", "smollm2-135m", "gemma3-270m")
ESTIMATORS = ("hill", "farms")
COLUMNS = ("alpha_hill", "alpha")


def measure(model: str, estimator: str) -> dict:
    import spectune

    t = time.perf_counter()
    result = spectune.analyze(model, alpha_estimator=estimator, progress=False)
    out = {"seconds": time.perf_counter() - t, "flags": result.flag_counts()}
    for col in COLUMNS:
        out[col] = result.distinguishable(col).to_dict(orient="records")
    return out


def markdown(results: dict) -> str:
    """One row per model, estimator and module type: distinguishable / matrices for each column."""
    lines = ["| model | estimator | module type | matrices | alpha_hill: distinguishable (unflagged) / flagged, I^2 "
             "| alpha: distinguishable (unflagged) / flagged, I^2 |", "|---|---|---|---|---|---|"]
    for model, per_est in results.items():
        for est, rec in per_est.items():
            by_col = {c: {r["module_type"]: r for r in rec[c]} for c in COLUMNS}
            for kind in sorted(by_col["alpha_hill"]):
                cells = []
                for c in COLUMNS:
                    r = by_col[c].get(kind)
                    cells.append("-" if r is None else f"{r['distinguishable']} ({r['distinguishable_unflagged']}) / "
                                 f"{r['flagged']}, {r['i2']:.2f}")
                n = by_col["alpha_hill"][kind]["matrices"]
                lines.append(f"| {model} | {est} | {kind} | {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--out", type=Path, default=RESULTS / "alpha_distinguishable.json")
    args = ap.parse_args()
    results = {m: {e: measure(m, e) for e in ESTIMATORS} for m in args.models}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"commit": commit, "results": results}, indent=2))
    print(markdown(results))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
