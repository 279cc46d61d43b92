"""The analysis run: stream matrices by shape group, one spectrum each, every metric from it.

Same-shape matrices are loaded together (up to ``batch_bytes``), so their
spectra are one batched eigensolve and their cross-layer inner products one
pass. A group bigger than the budget gets its spectra chunk by chunk and its
inner products band by band (rows [a, b) of every matrix at once: inner products
are sums over elements, so bands add up exactly), so memory stays at one chunk
whatever the model's size. The heap is handed back to the system between groups.

With ``ranks`` (see ``analyze.distributed``) each process computes the spectra of
its share of the matrices and its band of the inner products, and the ranks
exchange rows, spectra and k x k products: every rank returns the whole table.
"""

from __future__ import annotations

import math
import re
import time
import warnings
import zlib
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from spectune import _memory
from spectune._progress import Bar
from spectune.analyze import compute, crosslayer, powerlaw, spectral, tailfit
from spectune.analyze.config import AnalysisConfig
from spectune.analyze.distributed import Ranks, assign, band, cost
from spectune.analyze.naming import layer_index, module_type
from spectune.analyze.result import COLUMNS, AnalysisResult
from spectune.analyze.sources import WeightRef, WeightSource, open_source

# statuses whose matrices have a spectrum and take part in the cross-layer metrics
_MEASURED = ("ok", "too_small")


def analyze(model: Any, config: AnalysisConfig | None = None, *, ranks: Ranks | None = None,
            **options: Any) -> AnalysisResult:
    """Spectral metrics of every weight matrix of ``model`` (module, path or alias).

    ``ranks``: this process's place in a torch.distributed group whose ranks all
    call ``analyze`` on the same model and options; the work is split between them
    and each returns the same result (``analyze.distributed.launched_ranks`` makes one).
    """
    cfg = config or AnalysisConfig()
    if options:
        cfg = AnalysisConfig.model_validate({**cfg.model_dump(), **options})
    t0 = time.perf_counter()
    with open_source(model, trust_remote_code=cfg.trust_remote_code) as source:
        result = _Run(source, cfg, ranks).run()
    _memory.release_free_heap()
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


def by_shape(refs: list[WeightRef]) -> list[list[WeightRef]]:
    """Refs grouped by (rows, cols), groups in order of first appearance: the same on every rank."""
    groups: dict[tuple[int, int], list[WeightRef]] = defaultdict(list)
    for ref in refs:
        groups[(ref.rows, ref.cols)].append(ref)
    return list(groups.values())


def shuffle_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one matrix's shuffle (rand_distance), fixed by the seed and the matrix's name.

    Seeding per matrix rather than drawing from one stream keeps a matrix's value
    independent of which other matrices were analyzed before it, or on which rank.
    The seed is mixed into the low 32 bits: torch's CPU generator ignores the rest (so
    ``seed * 2**32 + crc``, used before, gave every seed the shuffles of seed 0, which
    keeps its values here).
    """
    return torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed * 0x9E3779B1) % 2**32)


class _Run:
    def __init__(self, source: WeightSource, cfg: AnalysisConfig, ranks: Ranks | None = None) -> None:
        self.source = source
        self.cfg = cfg
        self.ranks = ranks
        self.device = resolve_device(cfg.device)
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        self.refs = select(source.refs, cfg.include, cfg.exclude)
        self.rows: dict[str, dict[str, Any]] = {}
        self.spectra: dict[str, np.ndarray] = {}
        self.hists: dict[str, np.ndarray] = {}
        self.abs_sums: dict[str, float] = {}  # sum |w| of each matrix, for elementwise cross-entropy
        self.mine: list[str] = []  # names whose spectra this process computes

    # -- driver -------------------------------------------------------------------

    def run(self) -> AnalysisResult:
        if not self.refs:
            raise ValueError(
                f"no weight matrices to analyze in {self.source.identity}"
                + (" after --include/--exclude filters" if self.cfg.include or self.cfg.exclude else "")
            )
        dense = []
        for ref in self.refs:
            self.rows[ref.name] = self._identity(ref)
            if ref.quantized:
                self._status(ref.name, "quantized", f"stored as {ref.dtype}: packed integers, not weights")
            else:
                dense.append(ref)
        mine = self._share(dense)
        timings: dict[str, float] = {}
        rank0 = self.ranks is None or self.ranks.rank == 0
        label = self.source.identity + (f" (rank 0 of {self.ranks.world})" if self.ranks else "")
        short = label if len(label) <= 40 else "..." + label[-37:]
        with Bar(self.cfg.progress and rank0, len(mine), short, prefix="[bold]analyze[/] ") as bar:
            t, cpu = time.perf_counter(), time.process_time()
            for group in by_shape(mine):
                self._group(group, bar.advance, products=self.ranks is None)
                _memory.release_free_heap()
            timings["spectra_s"] = time.perf_counter() - t
            # CPU seconds tell how evenly ranks shared the work even when other jobs slow the wall clock
            timings["spectra_cpu_s"] = time.process_time() - cpu
        t = time.perf_counter()
        if self.ranks is not None:
            timings.update(self._join(dense, timings["spectra_s"], timings["spectra_cpu_s"]))
        if self.cfg.ce_mode == "histogram":
            self._histogram_ce()
        timings["cross_layer_s"] = time.perf_counter() - t
        rows = [self.rows[r.name] for r in self.refs]
        return AnalysisResult.from_rows(
            rows,
            spectra={r.name: self.spectra[r.name] for r in self.refs if r.name in self.spectra},
            source=self.source.identity,
            config=self.cfg.model_dump(),
            model_config=self.source.config,
            timings=timings,
        )

    def _share(self, dense: list[WeightRef]) -> list[WeightRef]:
        """The matrices whose spectra this process computes: all of them, or this rank's by cost."""
        if self.ranks is None:
            mine = dense
        else:
            owner = assign([cost(r.rows, r.cols) for r in dense], self.ranks.world)
            mine = [r for r, o in zip(dense, owner) if o == self.ranks.rank]
        self.mine = [r.name for r in mine]
        return mine

    def _join(self, dense: list[WeightRef], spectra_s: float, spectra_cpu_s: float) -> dict[str, float]:
        """Every rank's rows, spectra and histograms here; then the cross-layer products, band by band.

        Statuses must be known on every rank before the products, which leave out
        matrices without a spectrum; so the exchange comes first, then each rank
        adds its band of rows of every group and one all-reduce sums the bands.
        """
        assert self.ranks is not None
        payload = {
            "rows": {n: self.rows[n] for n in self.mine},
            "spectra": self.spectra,
            "hists": self.hists,
            "abs_sums": self.abs_sums,
            "spectra_s": spectra_s,
            "spectra_cpu_s": spectra_cpu_s,
        }
        parts = self.ranks.all_gather(payload)
        for part in parts:
            self.rows.update(part["rows"])
            self.spectra.update(part["spectra"])
            self.hists.update(part["hists"])
            self.abs_sums.update(part["abs_sums"])
        groups = by_shape(dense)  # the same list on every rank, so the flattened products line up
        partial = [self._banded(g, *band(g[0].rows, self.ranks.rank, self.ranks.world)) for g in groups]
        flat = [np.concatenate([d.ravel(), ce.ravel() if ce is not None else []]) for d, ce in partial]
        total = self.ranks.all_reduce_sum(np.concatenate(flat)) if flat else np.zeros(0)
        at = 0
        for group, (d, ce) in zip(groups, partial):
            k = len(group) ** 2
            dots = total[at : at + k].reshape(d.shape)
            at += k
            if ce is not None:
                ce = total[at : at + k].reshape(ce.shape)
                at += k
            self._cross(group, dots, ce)
        out: dict[str, float] = {}
        for key in ("spectra_s", "spectra_cpu_s"):
            values = [float(p[key]) for p in parts]
            out[key] = max(values)  # the slowest rank sets the pace
            out.update({f"{key}_rank{r}": v for r, v in enumerate(values)})
        return out

    # -- one shape group ------------------------------------------------------------

    def _group(self, group: list[WeightRef], advance: Any, products: bool) -> None:
        """Spectra of a same-shape group; with ``products``, its cross-layer metrics too.

        A group that fits in one chunk reuses the loaded matrices for its inner
        products; a bigger one is read again, band by band, after its spectra
        (statuses must be final before pairs are formed).
        """
        size = max(1, self.cfg.batch_bytes // max(group[0].numel * 4, 1))
        chunks = [group[i : i + size] for i in range(0, len(group), size)]
        if len(chunks) == 1:
            loaded = self._load(chunks[0])
            self._spectra(loaded)
            advance(len(group))
            if products:
                mats = [(i, w) for i, ref, w in loaded if self.rows[ref.name]["status"] in _MEASURED]
                self._cross(group, *self._products(group, mats))
            return
        for chunk in chunks:
            self._spectra(self._load(chunk))
            advance(len(chunk))
            _memory.release_free_heap()
        if products:
            self._cross(group, *self._banded(group, 0, group[0].rows))

    def _load(self, chunk: list[WeightRef]) -> list[tuple[int, WeightRef, torch.Tensor]]:
        """Load a chunk; matrices that can't be used get their status row and are dropped."""
        good = []
        for i, ref in enumerate(chunk):
            try:
                w = ref.load()
            except Exception as err:  # one unreadable tensor must not sink the run
                self._status(ref.name, "unreadable", str(err))
                continue
            if not w.dtype.is_floating_point:
                self._status(ref.name, "quantized", f"loaded as {w.dtype}")
                continue
            good.append((i, ref, w))
        return good

    def _banded(self, group: list[WeightRef], start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The group's inner products over rows [start, stop) of every measured matrix, read in bands.

        Each band holds the same rows of every matrix, within ``batch_bytes``; the
        products of all bands add up to the products of the whole matrices.
        """
        k = len(group)
        measured = [i for i, r in enumerate(group) if self.rows[r.name]["status"] in _MEASURED]
        fill = np.nan if len(measured) < 2 else 0.0  # no partners, no cross-layer metric: nothing to read
        dots = np.full((k, k), fill)
        ce = np.full((k, k), fill) if self.cfg.ce_mode == "elementwise" else None
        if len(measured) < 2 or start >= stop:
            return dots, ce
        step = max(1, self.cfg.batch_bytes // max(1, len(measured) * group[0].cols * 4))
        for a in range(start, stop, step):
            b = min(a + step, stop)
            d, h = self._products(group, [(i, group[i].load_rows(a, b)) for i in measured])
            dots += np.nan_to_num(d, nan=0.0)
            if ce is not None and h is not None:
                ce += np.nan_to_num(h, nan=0.0)
            _memory.release_free_heap()
        return dots, ce

    def _products(
        self, group: list[WeightRef], mats: list[tuple[int, torch.Tensor]]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """k x k inner products <A_i, A_j> (and the elementwise cross-entropy sums) of the given members.

        Entries of members not given are NaN. ``mats`` may hold whole matrices or
        the same band of rows of each; the cross-entropy's normalisers are whole-matrix
        sums, known from the spectrum pass.
        """
        k = len(group)
        dots = np.full((k, k), np.nan)
        ce = np.full((k, k), np.nan) if self.cfg.ce_mode == "elementwise" else None
        if not mats:
            return dots, ce
        idx = [i for i, _ in mats]
        ws = [w for _, w in mats]
        dots[np.ix_(idx, idx)] = compute.pairwise_dots(ws, ws, self.device, self.dtype).numpy()
        if ce is not None:
            s = torch.tensor([self.abs_sums[group[i].name] for i in idx], dtype=self.dtype, device=self.device)
            eps = crosslayer.CE_EPS

            def p(x: torch.Tensor) -> torch.Tensor:  # p = |w| / sum |w|, element-wise
                return x.abs() / s[:, None]

            h = compute.pairwise_dots(ws, ws, self.device, self.dtype, f=p, g=lambda x: torch.log(p(x) + eps))
            ce[np.ix_(idx, idx)] = -h.numpy()
        return dots, ce

    def _cross(self, group: list[WeightRef], dots: np.ndarray, ce: np.ndarray | None) -> None:
        """cs_metric (and elementwise ce_metric) of the measured members from the group's products."""
        measured = np.array([self.rows[r.name]["status"] in _MEASURED for r in group])
        dots = np.where(measured[:, None] & measured[None, :], dots, np.nan)
        cs = crosslayer.mean_off_diagonal(crosslayer.cosine_from_dots(dots))
        ce_mean = None
        if ce is not None:
            ce_mean = crosslayer.mean_off_diagonal(np.where(measured[:, None] & measured[None, :], ce, np.nan))
        for i, ref in enumerate(group):
            row = self.rows[ref.name]
            if row["status"] in _MEASURED:
                row["cs_metric"] = float(cs[i])
                if ce_mean is not None:
                    row["ce_metric"] = float(ce_mean[i])

    def _spectra(self, loaded: list[tuple[int, WeightRef, torch.Tensor]]) -> None:
        if not loaded:
            return
        mats = compute.to_device([w for _, _, w in loaded], self.device)  # one copy to a GPU, none on a CPU
        lam_t, finite = compute.eigenvalues(mats, self.device, self.dtype, self.cfg.method)
        lam = lam_t.double().numpy()
        lam_rand = self._shuffled_spectra(loaded) if self.cfg.randomize else None
        fitted = [i for i, (_, ref, _) in enumerate(loaded) if self._settle(ref, loaded[i][2], lam[i], bool(finite[i]))]
        fits, at = self._tail_fits(mats, lam, finite, [loaded[i][1] for i in fitted], fitted)
        for i in fitted:
            ref = loaded[i][1]
            self.rows[ref.name].update(spectral.tail_metrics(lam[i], ref.rows, ref.cols, tw_margin=self.cfg.tw_margin,
                                                             fits=(fits, at[i]) if i in at else None))
            self.rows[ref.name]["alpha_uncertainty"] = self.cfg.uncertainty
            if lam_rand is not None:
                self.rows[ref.name]["rand_distance"] = spectral.esd_distance(lam[i], lam_rand[i])
        measured = [i for i, (_, ref, _) in enumerate(loaded) if ref.name in self.spectra]
        if self.cfg.ce_mode == "histogram":
            rms = [math.sqrt(float(lam[i].sum()) / mats[i].numel()) for i in measured]
            for i, h in zip(measured, crosslayer.value_histograms([mats[i] for i in measured], self.cfg.ce_bins, rms)):
                self.hists[loaded[i][1].name] = h
        else:
            for i in measured:
                self.abs_sums[loaded[i][1].name] = float(torch.sum(mats[i].abs(), dtype=torch.float64))

    def _settle(self, ref: WeightRef, w: torch.Tensor, ev: np.ndarray, finite: bool) -> bool:
        """Status and norm metrics of one matrix from its spectrum; True when it gets tail fits."""
        row = self.rows[ref.name]
        if not finite:
            bad = int((~torch.isfinite(w)).sum())  # only bad matrices pay for a full pass
            self._status(ref.name, "nonfinite", f"{bad} NaN/Inf value(s) of {w.numel()}")
            return False
        if ev[-1] <= 0:
            if not bool(w.any()):
                self._status(ref.name, "zero", "all weights are zero")
                row["frobenius_norm"] = 0.0
            else:
                self._status(ref.name, "zero", "spectrum is zero to working precision")
            return False
        self.spectra[ref.name] = ev.astype(np.float64)
        row.update(spectral.norm_metrics(ev, ref.rows, ref.cols))
        if ev.size < self.cfg.min_evals:
            row["status"] = "too_small"
            row["note"] = f"{ev.size} eigenvalue(s) < min_evals={self.cfg.min_evals}: no tail fits"
            return False
        row["status"] = "ok"
        return True

    def _tail_fits(self, mats: list[torch.Tensor], lam: np.ndarray, finite: torch.Tensor, refs: list[WeightRef],
                   fitted: list[int]) -> tuple[dict[str, tailfit.TailFits], dict[int, int]]:
        """The power-law fits of the matrices ``fitted`` (positions in ``mats``), all in one batch.

        Returns the fits and, for each position, its row in them (absent: too few
        eigenvalues above EVALS_THRESH to fit anything).
        """
        pooled = self._farms(mats, lam, finite) if self.cfg.alpha_estimator == "farms" and fitted else {}
        spectra, rows, deff, top = [], {}, [], []
        for i in fitted:
            src = pooled.get(i, {}).get("tail_lam", lam[i])
            fit_lam = src[src > spectral.EVALS_THRESH]
            if fit_lam.size >= 2:
                self.rows[refs[fitted.index(i)].name]["alpha_design_effect"] = pooled.get(i, {}).get("design_effect", 1.0)
                rows[i] = len(spectra)
                spectra.append(fit_lam)
                deff.append(pooled.get(i, {}).get("design_effect", 1.0))
                top.append(pooled.get(i, {}).get("windows", 1))
        if not spectra:
            return {}, rows
        unc = tailfit.Uncertainty.parse(self.cfg.uncertainty, seed=self.cfg.seed)
        fits = tailfit.fit_tails(spectra, self.device, unc, design_effect=deff, top=top,
                                 max_candidates=powerlaw.FARMS_KS_CANDIDATES if pooled else None,
                                 names=[r.name for r, i in zip(refs, fitted) if i in rows])
        return fits, rows

    def _shuffled_spectra(self, loaded: list[tuple[int, WeightRef, torch.Tensor]]) -> np.ndarray:
        """Spectra of each matrix with its elements shuffled (rand_distance's reference), one per matrix."""
        shuffled = []
        for _, ref, w in loaded:
            perm = torch.randperm(w.numel(), generator=shuffle_generator(self.cfg.seed, ref.name))
            shuffled.append(w.reshape(-1)[perm].reshape(w.shape))
        return compute.eigenvalues(shuffled, self.device, self.dtype, self.cfg.method)[0].double().numpy()

    def _farms(self, mats: list[torch.Tensor], lam: np.ndarray, finite: torch.Tensor) -> dict[int, dict[str, Any]]:
        """FARMS: pooled window spectra of the matrices that will get tail fits, with their windows' overlap.

        Per matrix: ``tail_lam`` (the pooled spectrum), ``design_effect`` (``powerlaw.design_effect``)
        and ``windows`` (how many windows; the outlier test reads each one's top eigenvalue).
        A matrix that is itself one window (a square matrix under square windows no larger
        than it) keeps its own spectrum: its pooled spectrum would be exactly that.
        """
        rows, cols = mats[0].shape
        win = powerlaw.farms_windows(rows, cols, self.cfg.farms_window, self.cfg.farms_aspect, self.cfg.farms_windows_per_dim)
        fit = [i for i in range(len(mats)) if bool(finite[i]) and lam[i][-1] > 0 and lam[i].size >= self.cfg.min_evals]
        if not fit:
            return {}
        if win.covers(rows, cols):
            return {i: {"tail_lam": lam[i], "design_effect": 1.0, "windows": 1} for i in fit}
        spectra = compute.window_eigenvalues([mats[i] for i in fit], win, self.device, self.dtype, self.cfg.method)
        deff = powerlaw.design_effect(win, rows, cols)
        return {i: {"tail_lam": powerlaw.pool_spectra([ev.clamp_min(0).numpy()]), "design_effect": deff,
                    "windows": win.count} for i, ev in zip(fit, spectra)}

    # -- all layers -----------------------------------------------------------------

    def _histogram_ce(self) -> None:
        names = [r.name for r in self.refs if r.name in self.hists]  # one order on every rank
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
