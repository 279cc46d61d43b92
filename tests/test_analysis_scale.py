"""Analysis memory does not grow with the model: a sharded bf16 checkpoint is streamed, not loaded.

The checkpoint is written by bench/llm_checkpoint.py's writer (the one that builds the
1.1B and 7B benchmark checkpoints), at a size a test can afford: 12 blocks of tall
65536 x 64 MLP matrices, 304 MB of bf16 in 32 MB shards. The analysis runs in a
child process that reports how far its resident memory rose above where it stood
after the imports. Holding the model (304 MB in bf16, 608 MB as float32) cannot fit
under the bound; streaming one chunk of same-shape matrices at a time does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux's resettable peak-RSS counter (/proc/self/clear_refs)")


def bench_writer():  # type: ignore[no-untyped-def]
    """bench/llm_checkpoint.py as a module (bench/ is scripts, not a package), loaded once."""
    if "llm_checkpoint" not in sys.modules:
        spec = importlib.util.spec_from_file_location("llm_checkpoint", ROOT / "bench" / "llm_checkpoint.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules["llm_checkpoint"] = mod  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(mod)
    return sys.modules["llm_checkpoint"]


CHILD = textwrap.dedent(
    """
    import json, sys
    import spectune
    from spectune import _memory

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    before = rss_mb()
    _memory.reset_peak()
    res = spectune.analyze(sys.argv[1], progress=False, device="cpu")
    peak = _memory.peak_rss_mb()
    m = res.metrics
    print(json.dumps({"before_mb": before, "peak_mb": peak, "statuses": m["status"].value_counts().to_dict(),
                      "dtypes": sorted(set(m["dtype"])), "n": len(m), "cs_defined": int(m["cs_metric"].notna().sum())}))
    """
)


@pytest.mark.slow
def test_peak_memory_of_a_sharded_bf16_checkpoint_stays_at_one_chunk(tmp_path: Path) -> None:
    lc = bench_writer()
    shape = lc.LlamaShape("scale-test", layers=12, hidden=64, intermediate=65536, heads=4, kv_heads=2, vocab=65536)
    folder = lc.write_checkpoint(shape, tmp_path / "ckpt", shard_bytes=32 * MB)
    shards = lc.shard_sizes_mb(folder)
    total, largest = sum(shards), max(shards)
    assert len(shards) >= 8 and largest <= 32 and total > 290  # the model is many shards, not one
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["n"] == 12 * 7 + 2 and rec["statuses"] == {"ok": rec["n"]}
    assert rec["dtypes"] == ["BF16"]
    assert rec["cs_defined"] == rec["n"]  # the cross-layer products were formed for every group
    growth = rec["peak_mb"] - rec["before_mb"]
    # what the engine lets itself hold: one chunk of a group, or one band of rows of every matrix of a group
    # (either within batch_bytes = 128 MB counted as float32, i.e. 64 MB of bf16), a 16 MB float64 slice
    # buffer per side of a product and a value histogram's transients; the model itself is 304 MB
    bound = largest + 192
    assert growth <= bound, f"analysis grew the process by {growth:.0f} MB (bound {bound:.0f} MB, model {total:.0f} MB)"
    assert bound < total  # the bound could not be met by holding the model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none here): where one is at hand, "
                    "the CUDA spectra are checked against the CPU table")
def test_cuda_analysis_agrees_with_the_cpu_table(tmp_path: Path) -> None:
    lc = bench_writer()
    shape = lc.LlamaShape("gpu-test", layers=2, hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=1024)
    folder = lc.write_checkpoint(shape, tmp_path / "ckpt", shard_bytes=2 * MB)
    import spectune

    cpu = spectune.analyze(folder, progress=False, device="cpu").metrics
    gpu = spectune.analyze(folder, progress=False, device="cuda").metrics
    assert list(cpu["status"]) == list(gpu["status"])
    for col in ("frobenius_norm", "spectral_norm", "stable_rank", "effective_rank", "mp_sigma", "cs_metric"):
        np.testing.assert_allclose(gpu[col].astype(float), cpu[col].astype(float), rtol=1e-9, err_msg=col)


@pytest.mark.parametrize("shape", [(1100, 600), (520, 1300)], ids=["tall", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_gram_lower_triangle_and_spectrum_are_exact(shape: tuple[int, int], dtype: torch.dtype,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gram of a matrix with a short side of 520-600 is built in 2 block rows, over many slices."""
    from spectune.analyze import compute

    monkeypatch.setattr(compute, "SLICE_BYTES", 2 * 600 * 8 * 97)  # 97 rows of the long side a slice
    assert len(compute._triangle_cuts(min(shape))) == 3
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2)]
    g = compute.gram(mats, torch.device("cpu"), torch.float64)
    lam, finite = compute.eigenvalues(mats, torch.device("cpu"), torch.float64)
    assert finite.all()
    for i, w in enumerate(mats):
        x = w.double().numpy()
        ref = x.T @ x if shape[0] >= shape[1] else x @ x.T
        np.testing.assert_allclose(np.tril(g[i].numpy()), np.tril(ref), rtol=0, atol=1e-12 * np.abs(ref).max())
        s = np.linalg.svd(x, compute_uv=False)
        np.testing.assert_allclose(lam[i].numpy(), np.sort(s**2), rtol=0, atol=1e-12 * s.max() ** 2)
