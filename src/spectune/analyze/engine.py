"""The analysis run: stream matrices by shape group, one spectrum each, every metric from it.

Same-shape matrices are loaded together (up to ``batch_bytes``), so their
spectra are one batched eigensolve and their cross-layer inner products one
pass; a group bigger than the budget is processed in chunks, re-reading a chunk
for each pair of chunks rather than holding the group in memory.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from spectune.analyze import compute, crosslayer, powerlaw, spectral
from spectune.analyze.config import AnalysisConfig
from spectune.analyze.naming import layer_index, module_type
from spectune.analyze.result import COLUMNS, AnalysisResult
from spectune.analyze.sources import WeightRef, WeightSource, open_source


def analyze(model: Any, config: AnalysisConfig | None = None, **options: Any) -> AnalysisResult:
    """Spectral metrics of every weight matrix of ``model`` (module, path or alias)."""
    cfg = config or AnalysisConfig()
    if options:
        cfg = AnalysisConfig.model_validate({**cfg.model_dump(), **options})
    t0 = time.perf_counter()
    with open_source(model, trust_remote_code=cfg.trust_remote_code) as source:
        result = _Run(source, cfg).run()
    result.timings["total_s"] = time.perf_counter() - t0
    return result


def select(refs: list[WeightRef], include: list[str], exclude: list[str]) -> list[WeightRef]:
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return [
        r
        for r in refs
        if (not inc or any(p.search(r.name) for p in inc)) and not any(p.search(r.name) for p in exc)
    ]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


class _Run:
    def __init__(self, source: WeightSource, cfg: AnalysisConfig) -> None:
        self.source = source
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        self.refs = select(source.refs, cfg.include, cfg.exclude)
        self.rows: dict[str, dict[str, Any]] = {}
        self.spectra: dict[str, np.ndarray] = {}
        self.hists: dict[str, np.ndarray] = {}
        self.gen = torch.Generator().manual_seed(cfg.seed)

    # -- driver -------------------------------------------------------------------

    def run(self) -> AnalysisResult:
        if not self.refs:
            raise ValueError(
                f"no weight matrices to analyze in {self.source.identity}"
                + (" after --include/--exclude filters" if self.cfg.include or self.cfg.exclude else "")
            )
        groups: dict[tuple[int, int], list[WeightRef]] = defaultdict(list)
        for ref in self.refs:
            self.rows[ref.name] = self._identity(ref)
            if ref.quantized:
                self._status(ref.name, "quantized", f"stored as {ref.dtype}: packed integers, not weights")
            else:
                groups[(ref.rows, ref.cols)].append(ref)
        timings: dict[str, float] = {}
        with _progress(self.cfg.progress, len(self.refs), self.source.identity) as advance:
            advance(sum(r.quantized for r in self.refs))
            t = time.perf_counter()
            for group in groups.values():
                self._group(group, advance)
            timings["spectra_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.cfg.ce_mode == "histogram":
            self._histogram_ce()
        timings["cross_layer_s"] = time.perf_counter() - t
        rows = [self.rows[r.name] for r in self.refs]
        return AnalysisResult.from_rows(
            rows,
            spectra=self.spectra,
            source=self.source.identity,
            config=self.cfg.model_dump(),
            model_config=self.source.config,
            timings=timings,
        )

    # -- one shape group ------------------------------------------------------------

    def _group(self, group: list[WeightRef], advance: Any) -> None:
        per = group[0].numel * 4
        size = max(1, self.cfg.batch_bytes // max(per, 1))
        chunks = [group[i : i + size] for i in range(0, len(group), size)]
        k = len(group)
        dots = np.full((k, k), np.nan)
        ce = np.full((k, k), np.nan) if self.cfg.ce_mode == "elementwise" else None
        offsets = np.cumsum([0] + [len(c) for c in chunks])
        if len(chunks) == 1:
            a = self._load(chunks[0])
            self._spectra(a)
            advance(len(group))
            self._pairwise(a, a, 0, 0, group, dots, ce)
        else:
            # statuses must be final before pairs are formed, so spectra go first, then
            # every pair of chunks is re-read (memory stays at two chunks)
            for chunk in chunks:
                self._spectra(self._load(chunk))
                advance(len(chunk))
            for ci in range(len(chunks)):
                a = self._load(chunks[ci], quiet=True)
                for cj in range(ci, len(chunks)):
                    b = a if cj == ci else self._load(chunks[cj], quiet=True)
                    self._pairwise(a, b, offsets[ci], offsets[cj], group, dots, ce)
        cos = crosslayer.cosine_from_dots(dots) if k else dots
        cs = crosslayer.mean_off_diagonal(cos)
        ce_mean = crosslayer.mean_off_diagonal(ce) if ce is not None else None
        for idx, ref in enumerate(group):
            row = self.rows[ref.name]
            if row["status"] in ("ok", "too_small"):
                row["cs_metric"] = float(cs[idx])
                if ce_mean is not None:
                    row["ce_metric"] = float(ce_mean[idx])

    def _load(self, chunk: list[WeightRef], quiet: bool = False) -> list[tuple[int, WeightRef, torch.Tensor]]:
        """Load a chunk; matrices that can't be used get their status row and are dropped."""
        good = []
        for ref in chunk:
            if not quiet and self.rows[ref.name]["status"] != "pending":
                continue
            if quiet and self.rows[ref.name]["status"] not in ("ok", "too_small"):
                continue
            try:
                w = ref.load()
            except Exception as err:  # one unreadable tensor must not sink the run
                self._status(ref.name, "unreadable", str(err))
                continue
            if not w.dtype.is_floating_point:
                self._status(ref.name, "quantized", f"loaded as {w.dtype}")
                continue
            good.append((chunk.index(ref), ref, w))
        return good

    def _spectra(self, loaded: list[tuple[int, WeightRef, torch.Tensor]]) -> None:
        if not loaded:
            return
        mats = [w for _, _, w in loaded]
        lam_t, finite = compute.eigenvalues(mats, self.device, self.dtype, self.cfg.method)
        lam = lam_t.double().numpy()
        if self.cfg.randomize:
            shuffled = [w.reshape(-1)[torch.randperm(w.numel(), generator=self.gen)].reshape(w.shape) for w in mats]
            lam_rand = compute.eigenvalues(shuffled, self.device, self.dtype, self.cfg.method)[0].double().numpy()
        pooled = self._farms(mats, lam, finite) if self.cfg.alpha_estimator == "farms" else {}
        for i, (_, ref, w) in enumerate(loaded):
            ev = lam[i]
            row = self.rows[ref.name]
            if not bool(finite[i]):
                bad = int((~torch.isfinite(w)).sum())  # only bad matrices pay for a full pass
                self._status(ref.name, "nonfinite", f"{bad} NaN/Inf value(s) of {w.numel()}")
                continue
            if ev[-1] <= 0:
                if not bool(w.any()):
                    self._status(ref.name, "zero", "all weights are zero")
                    row["frobenius_norm"] = 0.0
                else:
                    self._status(ref.name, "zero", "spectrum is zero to working precision")
                continue
            self.spectra[ref.name] = ev.astype(np.float64)
            row.update(spectral.norm_metrics(ev, ref.rows, ref.cols))
            if ev.size < self.cfg.min_evals:
                row["status"] = "too_small"
                row["note"] = f"{ev.size} eigenvalue(s) < min_evals={self.cfg.min_evals}: no tail fits"
            else:
                row["status"] = "ok"
                row.update(spectral.tail_metrics(ev, ref.rows, ref.cols, tw_margin=self.cfg.tw_margin, **pooled.get(i, {})))
                if self.cfg.randomize:
                    row["rand_distance"] = spectral.esd_distance(ev, lam_rand[i])
            if self.cfg.ce_mode == "histogram":
                rms = math.sqrt(float(ev.sum()) / w.numel())
                self.hists[ref.name] = crosslayer.value_histogram(w, self.cfg.ce_bins, rms=rms)

    def _farms(self, mats: list[torch.Tensor], lam: np.ndarray, finite: torch.Tensor) -> dict[int, dict[str, Any]]:
        """FARMS: pooled window spectra of the matrices that will get tail fits, as tail_metrics arguments.

        A matrix that is itself one window (a square matrix under square windows no larger
        than it) keeps its own spectrum: its pooled spectrum would be exactly that.
        """
        rows, cols = mats[0].shape
        win = powerlaw.farms_windows(rows, cols, self.cfg.farms_window, self.cfg.farms_aspect, self.cfg.farms_windows_per_dim)
        fit = [i for i in range(len(mats)) if bool(finite[i]) and lam[i][-1] > 0 and lam[i].size >= self.cfg.min_evals]
        if not fit:
            return {}
        if win.covers(rows, cols):
            pooled = {i: lam[i] for i in fit}
        else:
            spectra = compute.window_eigenvalues([mats[i] for i in fit], win, self.device, self.dtype, self.cfg.method)
            pooled = {i: powerlaw.pool_spectra([ev.clamp_min(0).numpy()]) for i, ev in zip(fit, spectra)}
        return {i: {"tail_lam": ev, "max_candidates": powerlaw.FARMS_KS_CANDIDATES} for i, ev in pooled.items()}

    def _pairwise(
        self,
        a: list[tuple[int, WeightRef, torch.Tensor]],
        b: list[tuple[int, WeightRef, torch.Tensor]],
        off_a: int,
        off_b: int,
        group: list[WeightRef],
        dots: np.ndarray,
        ce: np.ndarray | None,
    ) -> None:
        a = [x for x in a if self.rows[x[1].name]["status"] in ("ok", "too_small")]
        b = [x for x in b if self.rows[x[1].name]["status"] in ("ok", "too_small")]
        if not a or not b:
            return
        ia = [off_a + i for i, _, _ in a]
        ib = [off_b + i for i, _, _ in b]
        ma = [w for _, _, w in a]
        mb = [w for _, _, w in b]
        d = compute.pairwise_dots(ma, mb, self.device, self.dtype).numpy()
        dots[np.ix_(ia, ib)] = d
        dots[np.ix_(ib, ia)] = d.T
        if ce is not None:
            sa = torch.tensor([float(w.abs().double().sum()) for w in ma], dtype=self.dtype, device=self.device)
            sb = torch.tensor([float(w.abs().double().sum()) for w in mb], dtype=self.dtype, device=self.device)
            eps = crosslayer.CE_EPS

            def log_q(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return torch.log(x.abs() / s[:, None] + eps)

            h_ab = -compute.pairwise_dots(ma, mb, self.device, self.dtype, f=lambda x: x.abs() / sa[:, None], g=lambda x: log_q(x, sb))
            h_ba = -compute.pairwise_dots(mb, ma, self.device, self.dtype, f=lambda x: x.abs() / sb[:, None], g=lambda x: log_q(x, sa))
            ce[np.ix_(ia, ib)] = h_ab.numpy()
            ce[np.ix_(ib, ia)] = h_ba.numpy()

    # -- all layers -----------------------------------------------------------------

    def _histogram_ce(self) -> None:
        names = list(self.hists)
        if len(names) < 2:
            return
        p = np.stack([self.hists[n] for n in names])
        ce = crosslayer.mean_off_diagonal(crosslayer.cross_entropy_matrix(p))
        for n, v in zip(names, ce):
            self.rows[n]["ce_metric"] = float(v)

    # -- rows -----------------------------------------------------------------------

    def _identity(self, ref: WeightRef) -> dict[str, Any]:
        row: dict[str, Any] = {c: math.nan for c in COLUMNS}
        row.update(
            name=ref.name,
            module_type=module_type(ref.name),
            layer_index=layer_index(ref.name),
            rows=ref.rows,
            cols=ref.cols,
            numel=ref.numel,
            dtype=ref.dtype,
            tied_to=",".join(ref.tied_to),
            alpha_estimator=self.cfg.alpha_estimator,
            status="pending",
            note="",
        )
        return row

    def _status(self, name: str, status: str, note: str) -> None:
        self.rows[name]["status"] = status
        self.rows[name]["note"] = note
        if status in ("nonfinite", "unreadable"):
            warnings.warn(f"{name}: {status}: {note}", stacklevel=3)


class _progress:
    """A rich progress bar over matrices (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n=1: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("[bold]analyze[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        self._bar.__enter__()
        short = self.label if len(self.label) <= 40 else "..." + self.label[-37:]
        task = self._bar.add_task(short, total=self.total)
        return lambda n=1: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
