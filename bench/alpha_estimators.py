"""Hill against FARMS: what each estimator says about matrices of different shapes, and what FARMS costs.

Three measurements, one JSON (bench/results/alpha_estimators.json) and a table on stdout:

  shapes   the same random generator (Gaussian; Student-t with 3 degrees of freedom) at
           768 x 768 and 3072 x 768: alpha_hill (median xmin) on the matrix's own spectrum
           (hill) and on the pooled square-window spectrum (farms), next to the
           Marchenko-Pastur population value of the median-xmin Hill exponent at aspect
           ratios 1 and 1/4 (numerical integration of the MP density, independent of the fits)
  minilm   spectune.analyze("minilm") under both estimators: mean alpha_hill of the
           attention and the MLP matrices, and the mean alpha-balance rate of each
  cost     wall and CPU time of spectune.analyze("minilm") under each estimator, the
           minimum over --repeat alternating runs, and their ratio (farms / hill)

Usage:
  .venv/bin/python bench/alpha_estimators.py              # everything (~1 min on 2 idle cores)
  .venv/bin/python bench/alpha_estimators.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def mp_median_hill(ratio: float) -> float:
    """Population value of the median-xmin Hill exponent of a Marchenko-Pastur law (short/long = ratio).

    alpha = 1 + 1 / E[ln(lam / m) | lam >= m], m the median: the limit of hill_alpha at
    i = n // 2 as n grows (the Hill estimator is a mean of log-ratios over the upper half).
    """
    from scipy import integrate, optimize

    a, b = (1 - ratio**0.5) ** 2, (1 + ratio**0.5) ** 2

    def density(x: float) -> float:
        return float(np.sqrt(max((b - x) * (x - a), 0.0)) / (2 * np.pi * ratio * x))

    def cdf(m: float) -> float:
        return integrate.quad(density, a, m, limit=200)[0]

    median = optimize.brentq(lambda m: cdf(m) - 0.5, a + 1e-12, b)
    mean_log = integrate.quad(lambda x: np.log(x / median) * density(x), median, b, limit=200)[0] / 0.5
    return 1.0 + 1.0 / mean_log


def shapes(seed: int = 0) -> list[dict]:
    from spectune.analyze import compute, powerlaw

    cpu = torch.device("cpu")
    rows = []
    gens = {
        "gaussian": lambda shape, g: torch.randn(*shape, generator=g, dtype=torch.float64),
        "student_t3": lambda shape, g: _student_t(shape, 3.0, g),
    }
    for name, make in gens.items():
        g = torch.Generator().manual_seed(seed)
        for shape in [(768, 768), (3072, 768)]:
            w = make(shape, g)
            lam = compute.eigenvalues([w], cpu, torch.float64)[0][0].numpy()
            win = powerlaw.farms_windows(*shape)
            pooled = powerlaw.pool_spectra([compute.window_eigenvalues([w], win, cpu, torch.float64)[0].numpy()])
            rows.append({
                "generator": name,
                "shape": f"{shape[0]}x{shape[1]}",
                "aspect": shape[0] / shape[1],
                "hill": powerlaw.fit_median(lam).alpha,
                "farms": powerlaw.fit_median(pooled).alpha,
                "farms_windows": win.count,
            })
    return rows


def _student_t(shape: tuple[int, int], df: float, g: torch.Generator) -> torch.Tensor:
    """Student-t entries from a seeded generator: z / sqrt(chi2_df / df)."""
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    chi2 = torch.randn(int(df), *shape, generator=g, dtype=torch.float64).pow(2).sum(0)
    return z / torch.sqrt(chi2 / df)


def minilm(estimator: str) -> tuple[dict, float, float]:
    import spectune

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    result = spectune.analyze("minilm", alpha_estimator=estimator, progress=False)
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    ok = result.ok
    attn = ok[ok["module_type"].str.startswith("attn")]
    mlp = ok[ok["module_type"].str.startswith("ffn")]
    plan = spectune.plan(result, "alpha-balance")
    rate = lambda df: float(np.mean([plan.lr_scale[n] for n in df["name"]]))  # noqa: E731
    rec = {
        "attention_alpha_hill": float(attn["alpha_hill"].mean()),
        "mlp_alpha_hill": float(mlp["alpha_hill"].mean()),
        "by_module_type": {k: float(v) for k, v in ok.groupby("module_type")["alpha_hill"].mean().items()},
        "alpha_balance_attention_rate": rate(attn),
        "alpha_balance_mlp_rate": rate(mlp),
    }
    return rec, wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    out: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                             "cores": len(__import__("os").sched_getaffinity(0)),
                             "load_before": __import__("os").getloadavg()[0]}}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        out["commit"] = ""
    out["mp_population"] = {"aspect_1": mp_median_hill(1.0), "aspect_4": mp_median_hill(0.25)}
    out["shapes"] = shapes()
    minilm("hill")  # warm caches (safetensors pages, imports) before timing
    times: dict[str, list[tuple[float, float]]] = {"hill": [], "farms": []}
    for _ in range(args.repeat):
        for est in ("hill", "farms"):
            rec, wall, cpu = minilm(est)
            out.setdefault("minilm", {})[est] = rec
            times[est].append((wall, cpu))
    cost = {est: {"wall_s": min(w for w, _ in v), "cpu_s": min(c for _, c in v)} for est, v in times.items()}
    cost["ratio_wall"] = cost["farms"]["wall_s"] / cost["hill"]["wall_s"]
    cost["ratio_cpu"] = cost["farms"]["cpu_s"] / cost["hill"]["cpu_s"]
    out["cost"] = cost
    out["machine"]["load_after"] = __import__("os").getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "alpha_estimators.json").write_text(json.dumps(out, indent=2))

    mp = out["mp_population"]
    print(f"MP population value of the median-xmin Hill alpha: aspect 1 {mp['aspect_1']:.3f}, aspect 4 {mp['aspect_4']:.3f}")
    print(f"{'generator':<12} {'shape':<10} {'hill':>7} {'farms':>7} {'windows':>8}")
    for r in out["shapes"]:
        print(f"{r['generator']:<12} {r['shape']:<10} {r['hill']:7.3f} {r['farms']:7.3f} {r['farms_windows']:8d}")
    for est, rec in out["minilm"].items():
        print(f"minilm {est:<6} alpha_hill attention {rec['attention_alpha_hill']:.3f} MLP {rec['mlp_alpha_hill']:.3f}; "
              f"alpha-balance rate attention {rec['alpha_balance_attention_rate']:.3f} MLP {rec['alpha_balance_mlp_rate']:.3f}")
    print(f"cost (min of {args.repeat}): hill {cost['hill']['wall_s']:.2f} s wall / {cost['hill']['cpu_s']:.2f} s CPU, "
          f"farms {cost['farms']['wall_s']:.2f} s / {cost['farms']['cpu_s']:.2f} s; "
          f"farms / hill = {cost['ratio_wall']:.2f}x wall, {cost['ratio_cpu']:.2f}x CPU")
    print(f"-> {RESULTS / 'alpha_estimators.json'}")


if __name__ == "__main__":
    main()
