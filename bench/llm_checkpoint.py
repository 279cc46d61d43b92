"""``spectune analyze`` on LLM-sized checkpoints: wall time, peak memory, the svdvals floor, 1 vs N processes.

No model hub is reachable here, so the checkpoints are written locally: randomly
initialised (normal, std 0.02 as Llama's ``initializer_range``) bfloat16
safetensors with the exact tensor names and shapes of TinyLlama-1.1B and
Llama-2-7B, sharded (at most ``--shard-gb`` a shard) with a
``model.safetensors.index.json`` and a ``config.json``, cached under
``--cache`` (default ``$SPECTUNE_CACHE/bench``, else ``~/.cache/spectune/bench``).
A checkpoint folder is built beside its final name and renamed into place with a
completion marker, so a killed write is never mistaken for a checkpoint.

Measurements, each a fresh process (its peak RSS is read with ``os.wait4``; for
torchrun it is the largest process of the launch):
  analyze        spectune analyze FOLDER [--include ...] --no-report   (1 process)
  torchrun-N     torchrun --nproc_per_node N -m spectune.cli analyze ... (N processes)
  floor          bare float32 svdvals loop over the same matrices (bench/analyze_speed.py's floor)
  KIND@2blocks   any of these on blocks 0 and 1 only
Every process runs single-threaded (OMP_NUM_THREADS=1), so 1 vs N processes is a
speed-up over cores, not over thread counts. Work times are the analysis' own
(``timings.total_s`` of summary.json; the floor's loop), without interpreter start.

Usage:
  .venv/bin/python bench/llm_checkpoint.py                       # everything in DEFAULT_KINDS
  .venv/bin/python bench/llm_checkpoint.py --models tinyllama-1.1b --kinds analyze torchrun-2
  .venv/bin/python bench/llm_checkpoint.py --models tinyllama-1.1b --kinds analyze@2blocks floor@2blocks
  .venv/bin/python bench/llm_checkpoint.py --write-only           # only build the cached checkpoints

Results: bench/results/llm_checkpoint.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GIB = 2**30
MIB = 2**20
MARKER = "spectune_bench.json"  # written last into a checkpoint folder: present = the folder is whole
RSS_MARGIN_MB = 1024.0  # target: peak RSS <= largest shard + 1 GB


@dataclass(frozen=True)
class LlamaShape:
    """The tensor shapes of a Llama-architecture causal LM (Hugging Face names)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order transformers saves them."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.self_attn.q_proj.weight", (h, h)
            yield f"{p}.self_attn.k_proj.weight", (kv, h)
            yield f"{p}.self_attn.v_proj.weight", (kv, h)
            yield f"{p}.self_attn.o_proj.weight", (h, h)
            yield f"{p}.mlp.gate_proj.weight", (self.intermediate, h)
            yield f"{p}.mlp.up_proj.weight", (self.intermediate, h)
            yield f"{p}.mlp.down_proj.weight", (h, self.intermediate)
            yield f"{p}.input_layernorm.weight", (h,)
            yield f"{p}.post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        if not self.tie_word_embeddings:
            yield "lm_head.weight", (self.vocab, h)

    def n_parameters(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config(self) -> dict:
        """A transformers LlamaConfig dict (what a real checkpoint's config.json holds)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096 if self.hidden >= 4096 else 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
        }


SHAPES = {
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T: 1,100,048,384 parameters
    "tinyllama-1.1b": LlamaShape("tinyllama-1.1b", layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4,
                                 vocab=32000),
    # meta-llama/Llama-2-7b-hf: 6,738,415,616 parameters (13.5 GB in bf16)
    "llama2-7b": LlamaShape("llama2-7b", layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                            vocab=32000),
}
# what each model is analyzed on: the 7B is restricted to two blocks (the issue's --include run)
TWO_BLOCKS = [r"model\.layers\.(0|1)\."]
INCLUDE = {"tinyllama-1.1b": [], "llama2-7b": TWO_BLOCKS}
# the 1.1B whole (1 and 2 processes), and its floor ratio on two blocks; the 7B on two blocks
DEFAULT_KINDS = {"tinyllama-1.1b": ["analyze", "torchrun-2", "analyze@2blocks", "floor@2blocks"],
                 "llama2-7b": ["analyze", "floor"]}
# a kind ending in @2blocks runs on blocks 0 and 1 only (a quick pair: the whole 1.1B floor takes ~5 CPU-minutes)
SUBSET = "@2blocks"


# ---------------------------------------------------------------------------------
# writing checkpoints
# ---------------------------------------------------------------------------------


def cache_root() -> Path:
    root = os.environ.get("SPECTUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "spectune") / "bench"


def random_tensor(shape: tuple[int, ...], name: str, seed: int = 0, std: float = 0.02):  # type: ignore[no-untyped-def]
    """A bf16 tensor of N(0, std^2) weights (ones for 1-D norm weights), fixed by the seed and the name."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).mul_(std).to(torch.bfloat16)


def write_checkpoint(shape: LlamaShape, folder: Path, shard_bytes: int = GIB, seed: int = 0) -> Path:
    """A sharded bf16 safetensors checkpoint of ``shape`` in ``folder`` (kept if already whole).

    Tensors go into shards in saving order, a new shard starting when the next
    tensor would take the current one over ``shard_bytes``; one shard is in memory
    at a time.
    """
    from safetensors.torch import save_file

    if (folder / MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards: list[list[str]] = []
    current: dict = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, str(tmp / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for name, dims in shape.tensors():
        t = random_tensor(dims, name, seed)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = t
        size += nbytes
    flush()
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / final)
        weight_map.update({name: final for name in names})
    total = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(shape.config(), indent=1))
    (tmp / MARKER).write_text(json.dumps({"shape": asdict(shape), "seed": seed, "shard_bytes": shard_bytes,
                                          "n_parameters": shape.n_parameters()}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def shard_sizes_mb(folder: Path) -> list[float]:
    return [p.stat().st_size / MIB for p in sorted(folder.glob("*.safetensors"))]


# ---------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Sampler:
    """Peak anonymous and file-backed resident memory of one process, sampled every 50 ms from outside."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, rest = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(rest.split()[0]) // 1024)
            except (OSError, ValueError, IndexError):
                pass

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(self.peak)


def _run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` single-threaded; its wall time, CPU time and peak RSS (largest process of the tree)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        sampler = _Sampler(proc.pid)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); see {log}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024,
            "sampled_peak_mb": sampler.stop(), "command": " ".join(cmd)}


def measure_analyze(folder: Path, include: list[str], out: Path, log: Path, procs: int = 0) -> dict:
    """``spectune analyze`` (procs=0) or ``torchrun --nproc_per_node procs -m spectune.cli analyze``."""
    args = ["analyze", str(folder), "--no-report", "--out", str(out), "--device", "cpu"]
    for pattern in include:
        args += ["--include", pattern]
    if procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "spectune.cli", *args]
    else:
        cmd = [sys.executable, "-m", "spectune.cli", *args]
    rec = _run(cmd, log)
    summary = json.loads((out / "summary.json").read_text())
    timings = summary["timings"]
    rec["work_s"] = float(timings["total_s"])
    # CPU seconds of the spectra (all ranks together): what the work costs, whatever else shares the cores
    per_rank = [v for k, v in timings.items() if k.startswith("spectra_cpu_s_rank")]
    rec["work_cpu_s"] = float(sum(per_rank)) if per_rank else timings.get("spectra_cpu_s")
    rec["timings"] = timings
    rec["n_matrices"] = summary["model"]["n_matrices"]
    rec["status_counts"] = summary["model"]["status_counts"]
    rec["processes"] = max(procs, 1)
    return rec


def measure_floor(folder: Path, include: list[str], log: Path) -> dict:
    """The bare float32 svdvals loop over the same matrices, in a child (analyze_speed.py's floor)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        out = Path(tf.name)
    cmd = [sys.executable, str(HERE / "analyze_speed.py"), "--child", "svdvals_floor", str(folder), str(out)]
    if include:
        cmd += ["--floor-include", *include]
    rec = _run(cmd, log)
    child = json.loads(out.read_text())
    out.unlink()
    rec.update(work_s=child["work_s"], work_cpu_s=child["work_cpu_s"], timings=child["timings"],
               n_matrices=child["n_matrices"])
    return rec


def compare_tables(a: Path, b: Path) -> dict:
    """Largest difference between two metrics tables (same rows and columns required)."""
    import numpy as np
    import pandas as pd

    x, y = pd.read_parquet(a / "metrics.parquet"), pd.read_parquet(b / "metrics.parquet")
    same_shape = list(x.columns) == list(y.columns) and list(x["name"]) == list(y["name"])
    worst_abs = worst_rel = 0.0
    text_equal = True
    for c in x.columns:
        if pd.api.types.is_numeric_dtype(x[c]):
            u, v = x[c].astype(float).to_numpy(), y[c].astype(float).to_numpy()
            with np.errstate(invalid="ignore"):
                d = np.abs(u - v)
            d = np.where((np.isnan(u) & np.isnan(v)) | (u == v), 0.0, d)  # NaN = NaN and inf = inf count as equal
            worst_abs = max(worst_abs, float(np.nanmax(d)) if d.size else 0.0)
            scale = np.maximum(np.abs(u), np.abs(v))
            rel = np.where(scale > 0, d / np.where(scale > 0, scale, 1), 0.0)
            worst_rel = max(worst_rel, float(np.nanmax(rel)) if rel.size else 0.0)
        else:
            text_equal &= bool((x[c].astype(str) == y[c].astype(str)).all())
    return {"same_rows_and_columns": same_shape, "text_columns_equal": text_equal,
            "max_abs_diff": worst_abs, "max_rel_diff": worst_rel}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--kinds", nargs="+", help="analyze | torchrun-N | floor, optionally with @2blocks "
                    "(default: per model, DEFAULT_KINDS)")
    ap.add_argument("--cache", type=Path, default=None, help="where checkpoints are kept "
                    "(default: $SPECTUNE_CACHE/bench, else ~/.cache/spectune/bench)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="largest shard, GiB")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoints and stop")
    ap.add_argument("--out", type=Path, default=RESULTS / "llm_checkpoint.json")
    args = ap.parse_args(argv)
    cache = args.cache or cache_root()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = args.out.parent / "llm_checkpoint"
    work.mkdir(exist_ok=True)
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("models", {})
    results["machine"] = {"nproc": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    for model in args.models:
        shape = SHAPES[model]
        folder = cache / model
        t = time.perf_counter()
        existed = (folder / MARKER).exists()
        write_checkpoint(shape, folder, shard_bytes=int(args.shard_gb * GIB))
        shards = shard_sizes_mb(folder)
        print(f"{model}: {folder} ({len(shards)} shards, largest {max(shards):.0f} MiB, total {sum(shards) / 1024:.2f} GiB"
              f"{'' if existed else f', written in {time.perf_counter() - t:.0f} s'})", flush=True)
        if args.write_only:
            continue
        include = INCLUDE[model]
        mres = results["models"].setdefault(model, {})
        mres.update(folder=str(folder), n_parameters=shape.n_parameters(), shards_mb=shards,
                    largest_shard_mb=max(shards), include=include, runs=mres.get("runs", {}))
        limit = max(shards) + RSS_MARGIN_MB
        for kind in args.kinds or DEFAULT_KINDS[model]:
            log = work / f"{model}.{kind}.log"
            base = kind.removesuffix(SUBSET)
            patterns = TWO_BLOCKS if kind.endswith(SUBSET) else include
            print(f"  {kind} ... (load average {os.getloadavg()[0]:.1f})", flush=True)
            if base == "floor":
                rec = measure_floor(folder, patterns, log)
            else:
                procs = int(base.split("-")[1]) if base.startswith("torchrun") else 0
                rec = measure_analyze(folder, patterns, work / f"{model}.{kind}", log, procs)
            rec["include"] = patterns
            rec["loadavg_after"] = os.getloadavg()
            rec["rss_limit_mb"] = limit
            rec["rss_within_limit"] = rec["peak_rss_mb"] <= limit
            mres["runs"][kind] = rec
            print(f"    work {rec['work_s']:.1f} s (cpu {rec.get('work_cpu_s') or float('nan'):.1f} s), "
                  f"wall {rec['wall_s']:.1f} s, process cpu {rec['cpu_s']:.1f} s, "
                  f"peak RSS {rec['peak_rss_mb']:.0f} MiB (limit {limit:.0f}), {rec['n_matrices']} matrices", flush=True)
            args.out.write_text(json.dumps(results, indent=1))
        runs = mres["runs"]
        for suffix in ("", SUBSET):
            a, f = runs.get("analyze" + suffix), runs.get("floor" + suffix)
            if a and f:
                mres["spectune_over_floor" + suffix] = a["work_s"] / f["work_s"]
                if a.get("work_cpu_s") and f.get("work_cpu_s"):
                    mres["spectune_over_floor_cpu" + suffix] = a["work_cpu_s"] / f["work_cpu_s"]
        for kind in runs:
            if kind.startswith("torchrun") and "analyze" in runs:
                mres[f"speedup_{kind}"] = runs["analyze"]["work_s"] / runs[kind]["work_s"]
                ranks = [v for k, v in runs[kind]["timings"].items() if k.startswith("spectra_cpu_s_rank")]
                if ranks:  # the speed-up the split allows on idle cores: all ranks' CPU over the busiest rank's
                    mres[f"cpu_balance_speedup_{kind}"] = sum(ranks) / max(ranks)
                mres[f"table_diff_{kind}"] = compare_tables(work / f"{model}.analyze", work / f"{model}.{kind}")
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in mres.items() if k not in ("runs", "shards_mb")}, indent=1), flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
