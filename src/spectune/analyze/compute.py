"""Batched, memory-bounded linear algebra on stacks of same-shape matrices.

The spectrum of W (N x M) is taken from the smaller Gram matrix: eigvalsh of
W^T W (or W W^T) in float64 gives lambda = s^2 with absolute error about
eps64 * lambda_max, far below what float32 weights can resolve, and costs one
matmul plus an M x M symmetric eigensolve instead of an SVD of the full matrix.
The Gram is accumulated over slices of the long dimension so the float64 copy
of a large matrix (an embedding) never exists whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from spectune.analyze.powerlaw import FarmsWindows

# Working-set target of one float64 slice stack, bytes.
SLICE_BYTES = 16 * 2**20


def _slices(long_dim: int, width: int, batch: int, itemsize: int) -> list[tuple[int, int]]:
    step = max(1, SLICE_BYTES // max(1, batch * width * itemsize))
    return [(a, min(a + step, long_dim)) for a in range(0, long_dim, step)]


def to_device(mats: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The matrices on ``device`` in their storage dtype: one host-to-device copy each, reused by every pass.

    On a CPU this returns them as they are. On a GPU the Gram slices, the FARMS windows
    and the value histograms then read device memory instead of each copying from the host.
    """
    return [m if m.device == device else m.to(device, non_blocking=True) for m in mats]


def gram(mats: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Stack of Gram matrices over the short side: (B, m, m) with m = min(rows, cols), lower triangle only.

    The upper triangle above the diagonal blocks is left at zero: the result is for
    ``eigvalsh`` (which reads the lower triangle) and the diagonal, nothing else.

    One working buffer of at most SLICE_BYTES is filled slice by slice (``copy_``
    converts bf16/fp16/fp32 straight into it, with no intermediate stack) and the
    products are accumulated into the result in place, so the transient memory is
    the result plus one buffer, whatever the matrices' size or storage dtype.
    """
    rows, cols = mats[0].shape
    tall = rows >= cols
    short, long_dim = (cols, rows) if tall else (rows, cols)
    g = torch.zeros(len(mats), short, short, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    spans = _slices(long_dim, short, len(mats), itemsize)
    step = max(b - a for a, b in spans)
    buf = torch.empty((len(mats), step, short) if tall else (len(mats), short, step), dtype=dtype, device=device)
    cuts = _triangle_cuts(short)
    for a, b in spans:
        blk = buf[:, : b - a] if tall else buf[:, :, : b - a]
        for i, m in enumerate(mats):
            blk[i].copy_(m[a:b] if tall else m[:, a:b])
        x = blk if tall else blk.mT  # (B, slice, short) view either way
        # only the lower triangle, by block rows: eigvalsh reads no more, and it saves a quarter to
        # three eighths of the Gram's flops (the half a syrk would save, less the diagonal blocks)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            g[:, lo:hi, :hi].baddbmm_(x[:, :, lo:hi].mT, x[:, :, :hi])
    return g


# Block rows of the Gram's lower triangle: narrower blocks skip more of the upper triangle,
# but below ~256 columns a block's product runs slower per flop than the whole.
TRIANGLE_BLOCK = 256
TRIANGLE_PARTS = 4


def _triangle_cuts(m: int) -> list[int]:
    """Boundaries of the block rows in which ``gram`` fills the lower triangle of an m x m Gram."""
    parts = max(1, min(TRIANGLE_PARTS, m // TRIANGLE_BLOCK))
    return [m * i // parts for i in range(parts + 1)]


# Below this size a CPU eigensolve gains nothing from threads, and on a busy machine MKL's
# threads oversubscribe the cores (measured: 3x slower eigvalsh, 70x slower svdvals at load 6
# on 2 cores), so small eigensolves run single-threaded.
SINGLE_THREAD_MAX_DIM = 1024


@contextmanager
def _threads_for(n: int, device: torch.device) -> Iterator[None]:
    if device.type != "cpu" or n > SINGLE_THREAD_MAX_DIM:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Bytes of Gram matrices handed to one eigvalsh call: it copies its input, and on the CPU
# a batched call is a loop over the batch anyway, so small sub-batches cost nothing.
EIG_BYTES = 8 * 2**20


def _batches(finite: torch.Tensor, per_matrix: int) -> Iterator[slice | torch.Tensor]:
    """Indices of the finite matrices, in sub-batches of at most EIG_BYTES (at least one each)."""
    if not bool(finite.all()):
        yield from (idx[None] for idx in torch.nonzero(finite).flatten())
        return
    n = int(finite.numel())
    size = max(1, EIG_BYTES // max(1, per_matrix))
    yield from (slice(a, min(a + size, n)) for a in range(0, n, size))


def eigenvalues(
    mats: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype, method: str = "gram"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues of W^T W (squared singular values), (B, min(rows, cols)), and a finite mask (B,).

    ``method='gram'``: eigvalsh of the Gram matrix (fast, exact to float64 rounding).
    ``method='svd'``: svdvals of the matrix itself (the reference route; slower).
    Every weight enters some diagonal entry of the Gram matrix as w^2, so a NaN/Inf
    anywhere in W shows there: the mask is read from the M diagonal entries instead
    of a pass over all N*M weights. Rows of non-finite matrices are NaN.
    """
    if method == "svd":
        x = torch.stack(list(mats)).to(device=device, dtype=dtype)
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        lam = torch.full(x.shape[:1] + (min(x.shape[1:]),), float("nan"), dtype=dtype, device=device)
        if finite.any():
            with _threads_for(min(x.shape[1:]), x.device):
                s = torch.linalg.svdvals(x[finite])
            lam[finite] = (s * s).flip(-1)
    elif method == "gram":
        g = gram(mats, device, dtype)
        finite = torch.isfinite(torch.diagonal(g, dim1=-2, dim2=-1)).all(dim=1)
        lam = torch.full(g.shape[:2], float("nan"), dtype=dtype, device=device)
        with _threads_for(g.shape[-1], g.device):
            for idx in _batches(finite, g.shape[-1] ** 2 * g.element_size()):
                lam[idx] = torch.linalg.eigvalsh(g[idx], UPLO="L")  # gram fills the lower triangle
    else:
        raise ValueError(f"unknown spectrum method '{method}' (gram or svd)")
    return lam.clamp_min_(0).cpu(), finite.cpu()


def pairwise_dots(
    left: Sequence[torch.Tensor],
    right: Sequence[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    f: Callable[[torch.Tensor], torch.Tensor] | None = None,
    g: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(len(left), len(right)) matrix of <f(A_i), g(B_j)> over flattened elements, sliced.

    f and g act element-wise (None: the identity), so applying them slice by slice
    gives the same result. Passing the same sequence as ``left`` and ``right`` (a
    group against itself) reads each slice once. Slices are copied into one reused
    buffer per side, converting the storage dtype on the way.
    """
    same = right is left
    flat_l = [m.reshape(-1) for m in left]
    flat_r = flat_l if same else [m.reshape(-1) for m in right]
    n = flat_l[0].numel()
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.zeros(len(left), len(right), dtype=dtype, device=device)
    spans = _slices(n, 1, len(left) + (0 if same else len(right)), itemsize)
    step = max(b - a for a, b in spans)
    buf_l = torch.empty(len(left), step, dtype=dtype, device=device)
    buf_r = buf_l if same else torch.empty(len(right), step, dtype=dtype, device=device)
    for a, b in spans:
        raw_l = _fill(buf_l, flat_l, a, b)
        raw_r = raw_l if same else _fill(buf_r, flat_r, a, b)
        xl = f(raw_l) if f is not None else raw_l
        xr = g(raw_r) if g is not None else raw_r
        out.addmm_(xl, xr.T)
    return out.cpu()


def _fill(buf: torch.Tensor, flats: Sequence[torch.Tensor], a: int, b: int) -> torch.Tensor:
    """Elements [a, b) of each flattened matrix, as rows of the front of ``buf``."""
    view = buf[:, : b - a]
    for i, v in enumerate(flats):
        view[i].copy_(v[a:b])
    return view


# Bytes of float64 window copies handed to one batched eigensolve (FARMS).
WINDOW_BYTES = 64 * 2**20


def window_eigenvalues(
    mats: Sequence[torch.Tensor],
    windows: FarmsWindows,
    device: torch.device,
    dtype: torch.dtype,
    method: str = "gram",
) -> list[torch.Tensor]:
    """FARMS: every window's spectrum of each matrix, concatenated per matrix (unsorted, float64, CPU).

    The windows of all matrices go through ``eigenvalues`` in batches of at most
    WINDOW_BYTES of float64 copies, so a large matrix with many windows never holds
    every window copy at once.
    """
    h, w = windows.rows, windows.cols
    offsets = [(r, c) for r in windows.row_starts for c in windows.col_starts]
    jobs = [(i, r, c) for i in range(len(mats)) for r, c in offsets]
    per = max(1, WINDOW_BYTES // max(1, h * w * 8))
    parts: list[list[torch.Tensor]] = [[] for _ in mats]
    for a in range(0, len(jobs), per):
        chunk = jobs[a : a + per]
        lam, _ = eigenvalues([mats[i][r : r + h, c : c + w] for i, r, c in chunk], device, dtype, method)
        for (i, _, _), ev in zip(chunk, lam.double()):
            parts[i].append(ev)
    return [torch.cat(p) for p in parts]
