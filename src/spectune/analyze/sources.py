"""Where weights come from: a loaded module, a model folder, a safetensors file, a GGUF file.

Each source lists its matrices as ``WeightRef`` objects whose ``load()`` reads
one tensor on demand, so a folder of shards is streamed one tensor at a time and
the whole model never sits in memory. Every matrix comes back in (out, in)
orientation (GPT-2's Conv1D stores (in, out) and is transposed here), as float.
Nothing here unpickles: safetensors and GGUF only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectune.analyze.naming import module_type


class SourceError(ValueError):
    """A model source that cannot be read: the message says what and where."""


# safetensors dtype names that hold real numbers; anything else (I8, U8, I32...) is a
# quantized or packed encoding whose values are not the weights themselves.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# GPT-2 family Conv1D layers store weight as (in_features, out_features).
_CONV1D_NAME = re.compile(r"(c_attn|c_proj|c_fc)\.weight$")
_CONV1D_MODELS = {"gpt2", "gpt_bigcode", "openai-gpt", "imagegpt", "decision_transformer"}


@dataclass
class WeightRef:
    """One weight matrix of a model, readable on demand."""

    name: str
    shape: tuple[int, ...]  # canonical (out, in) for 2-D weights
    dtype: str
    loader: Callable[[], torch.Tensor]
    tied_to: tuple[str, ...] = ()
    quantized: bool = False
    # reads canonical rows [start, stop) alone, where the format allows (safetensors slices)
    row_loader: Callable[[int, int], torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def load(self) -> torch.Tensor:
        """The matrix as a 2-D tensor (higher-rank weights are flattened to (out, rest))."""
        t = self.loader()
        return t.reshape(t.shape[0], -1) if t.ndim > 2 else t

    def load_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the matrix, 2-D; from a safetensors file only those rows are read.

        Cross-layer inner products are sums over elements, so a group of matrices can
        be multiplied band by band (and a band can be one rank's share of the work).
        """
        t = self.row_loader(start, stop) if self.row_loader is not None else self.loader()[start:stop]
        return t.reshape(t.shape[0], -1) if t.ndim > 2 else t


@dataclass
class WeightSource:
    """An opened model: its identity, config and matrix references; close() releases files."""

    identity: str
    refs: list[WeightRef]
    config: dict[str, Any] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(model: Any, trust_remote_code: bool = False) -> WeightSource:
    """Open a module, a path (folder, .safetensors, .gguf) or a built-in alias."""
    if isinstance(model, torch.nn.Module):
        return from_module(model)
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        from spectune.analyze import builtin

        if text in builtin.ALIASES:
            return open_source(builtin.resolve(text), trust_remote_code=trust_remote_code)
        path = Path(text).expanduser()
        if not path.exists():
            known = ", ".join(sorted(builtin.ALIASES))
            raise SourceError(f"model not found: '{text}' is neither an existing path nor a built-in alias ({known})")
        if path.is_dir():
            return from_folder(path)
        if path.suffix == ".safetensors":
            return from_safetensors_files([path], identity=str(path))
        if path.suffix == ".gguf":
            return from_gguf(path)
        raise SourceError(
            f"unsupported model file '{path}': spectune reads .safetensors and .gguf files "
            "(pickled .bin/.pt checkpoints are not loaded: convert them to safetensors)"
        )
    raise SourceError(f"cannot analyze an object of type {type(model).__name__}")


# --- loaded modules ---------------------------------------------------------------


# PEFT's wrappers that are not adapted layers: a trained copy of a whole module, and prompt encoders
_ADAPTER_PARAM = re.compile(r"(^|\.)(modules_to_save|original_module|prompt_encoder)(\.|$)")
_PEFT_PREFIX = "base_model.model."


def _four_bit(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit parameter: packed bytes whose ``quant_state`` knows the real shape and scales."""
    return getattr(param, "quant_state", None) is not None and not param.dtype.is_floating_point


def dense(param: torch.Tensor) -> torch.Tensor:
    """The weights a parameter stands for: itself, or a 4-bit one dequantized (one matrix at a time).

    A QLoRA run's base weights are bitsandbytes ``Params4bit``; reading them through
    PEFT's dequantizer lets its plans be re-made between epochs like any other run's.
    """
    if _four_bit(param):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(param, state=param.quant_state)
    return param.detach()


def _adapter_wrappers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(name, wrapper, base layer) for every adapted layer: PEFT's tuners and SVFT all keep the original as ``base_layer``."""
    for mname, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, torch.nn.Module) and hasattr(base, "weight"):
            yield mname, mod, base


def _adapter_params(model: torch.nn.Module) -> set[str]:
    """Names of the parameters an adapter adds: everything in a wrapper outside its ``base_layer``.

    One rule for every kind (lora_A, hra_u, oft_R, boft_s, svft_m, ...), so a new kind's
    tensors are never read as weight matrices of their own.
    """
    return {
        f"{mname}.{pname}"
        for mname, mod, _ in _adapter_wrappers(model)
        for pname, _ in mod.named_parameters()
        if not pname.startswith("base_layer.")
    }


def _additive(mod: torch.nn.Module) -> bool:
    """LoRA-family and IA3 layers: W + get_delta_weight, exact also for 4-bit and Conv1D bases.

    DoRA is not: its magnitude vector rescales W + BA column by column.
    """
    dora = any(getattr(mod, "use_dora", {}).get(a, False) for a in getattr(mod, "active_adapters", []))
    return hasattr(mod, "get_delta_weight") and (hasattr(mod, "lora_A") or hasattr(mod, "ia3_l")) and not dora


def _applied_weight(mod: torch.nn.Module, base: torch.nn.Linear) -> torch.Tensor:
    """The (out, in) matrix an adapted linear layer applies, read from its response to the identity.

    Kinds differ in how they change W (added, rotated, scaled: LoHa, OFT, HRA, BOFT, MiSS,
    SVFT...), but every one is affine in its input, so f(I) - f(0) is the effective weight
    transposed, computed by the layer's own forward (in eval mode: no dropout).
    """
    n_in = base.in_features
    probe = torch.cat([torch.eye(n_in), torch.zeros(1, n_in)]).to(base.weight.device, base.weight.dtype)
    was_training = mod.training
    try:
        mod.eval()
        with torch.no_grad():
            out = mod(probe)
    finally:
        mod.train(was_training)
    return (out[:-1] - out[-1:]).t().contiguous()


def _peft_merged(model: torch.nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """Loaders of the trained weight of every adapted layer, keyed by the base weight's name.

    During adapter training the matrix that matters is the one the layer applies;
    reading the frozen base weight alone would show no training at all. A wrapper
    around something other than a plain linear layer with a non-additive kind reads
    as its base weight (no such kind is registered).
    """
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for mname, mod, base in _adapter_wrappers(model):
        if _additive(mod):

            def load(mod: Any = mod, base: Any = base) -> torch.Tensor:
                w = dense(base.weight)
                for adapter in getattr(mod, "active_adapters", []):
                    if adapter in getattr(mod, "lora_A", {}) or adapter in getattr(mod, "ia3_l", {}):
                        w = w + mod.get_delta_weight(adapter).detach().to(w.dtype)
                return w

        elif type(base) is torch.nn.Linear:

            def load(mod: Any = mod, base: Any = base) -> torch.Tensor:
                return _applied_weight(mod, base)

        else:
            continue
        out[f"{mname}.base_layer.weight"] = load
    return out


def canonical_name(name: str) -> str:
    """A parameter name without PEFT's wrapping (``base_model.model.`` and ``.base_layer``)."""
    name = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def from_module(model: torch.nn.Module) -> WeightSource:
    """Matrices of a loaded model; parameters sharing storage are listed once, as tied.

    PEFT-wrapped models are read as their merged weights under the base model's names;
    adapter matrices themselves (lora_A, lora_B, ...) are not rows.
    """
    merged = _peft_merged(model)
    adapter_params = _adapter_params(model)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # type: ignore[assignment]
    conv1d_params = {
        f"{mname}.weight" if mname else "weight"
        for mname, mod in model.named_modules()
        if isinstance(mod, Conv1D)
    }
    first_by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    ties: dict[str, list[str]] = {}
    order: list[tuple[str, torch.nn.Parameter]] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if (param.ndim < 2 and not _four_bit(param)) or (not param.dtype.is_floating_point and not _is_weight_name(name)):
            continue
        if name in adapter_params or _ADAPTER_PARAM.search(name):
            continue
        key = (param.data_ptr(), tuple(param.shape))
        if key in first_by_storage:
            ties[first_by_storage[key]].append(name)
            continue
        first_by_storage[key] = name
        ties[name] = []
        order.append((name, param))
    refs = []
    for name, param in order:
        transpose = name in conv1d_params
        shape = tuple(param.quant_state.shape) if _four_bit(param) else tuple(param.shape)
        if transpose:
            shape = (shape[1], shape[0])

        def loader(p: torch.nn.Parameter = param, t: bool = transpose, m: Any = merged.get(name)) -> torch.Tensor:
            w = m() if m is not None else dense(p)
            return w.t() if t else w

        refs.append(
            WeightRef(
                name=canonical_name(name),
                shape=shape,
                dtype="bnb-4bit" if _four_bit(param) else str(param.dtype).removeprefix("torch."),
                loader=loader,
                tied_to=tuple(canonical_name(t) for t in ties[name]),
                quantized=not (param.dtype.is_floating_point or _four_bit(param)),
            )
        )
    cfg = getattr(model, "config", None)
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    identity = config.get("_name_or_path") or type(model).__name__
    return WeightSource(identity=str(identity), refs=refs, config=config)


# --- safetensors files and folders ---------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SourceError(f"malformed config.json in {folder}: {err}") from err


def from_folder(folder: Path) -> WeightSource:
    """A Hugging Face model folder: sharded (with an index) or single-file safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SourceError(f"malformed shard index {index}: {err}") from err
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise SourceError(f"shard index {index} names missing file(s): {', '.join(missing)}")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            ggufs = sorted(folder.glob("*.gguf"))
            if ggufs:
                return from_gguf(ggufs[0])
            bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = f" (found pickled {', '.join(bins)}: convert to safetensors)" if bins else ""
            raise SourceError(f"no .safetensors or .gguf weights in folder {folder}{hint}")
    return from_safetensors_files(files, identity=str(folder), config=_read_config(folder))


def from_safetensors_files(
    files: list[Path], identity: str, config: dict[str, Any] | None = None
) -> WeightSource:
    """Matrices of safetensors files, each read by its own short-lived handle.

    A handle kept open for the whole run keeps every page it ever touched mapped,
    so resident memory would grow to the model's size (the leak users report in
    other tools); opening per read lets the mapping go with the tensor.
    """
    from safetensors import SafetensorError, safe_open

    config = config or {}
    transpose_conv1d = config.get("model_type") in _CONV1D_MODELS
    refs: list[WeightRef] = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                entries = [(name, handle.get_slice(name)) for name in handle.keys()]
                listed = [(name, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype())) for name, sl in entries]
        except (SafetensorError, OSError, ValueError) as err:
            raise SourceError(f"cannot read safetensors file {path}: {err} (truncated or corrupt?)") from err
        for name, shape, dtype in listed:
            if len(shape) < 2:
                continue
            if dtype not in _FLOAT_DTYPES and not _is_weight_name(name):
                continue  # integer buffers (position_ids...) are bookkeeping, not weights
            transpose = transpose_conv1d and bool(_CONV1D_NAME.search(name)) and len(shape) == 2
            if transpose:
                shape = (shape[1], shape[0])
            refs.append(
                WeightRef(
                    name=name,
                    shape=shape,
                    dtype=dtype,
                    loader=_safetensors_loader(path, name, transpose),
                    row_loader=_safetensors_row_loader(path, name, transpose),
                    quantized=dtype not in _FLOAT_DTYPES,
                )
            )
    _mark_file_ties(refs, config)
    return WeightSource(identity=identity, refs=refs, config=config)


def _is_weight_name(name: str) -> bool:
    """Packed quantized weights keep 'weight' in their names (weight, qweight, weight_packed)."""
    return "weight" in name.rsplit(".", 1)[-1]


def _safetensors_loader(path: Path, name: str, transpose: bool) -> Callable[[], torch.Tensor]:
    from safetensors import safe_open

    def load() -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as handle:
                t = handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types
            raise SourceError(f"cannot read tensor '{name}' from {path}: {err}") from err
        return t.t() if transpose else t

    return load


def _safetensors_row_loader(path: Path, name: str, transpose: bool) -> Callable[[int, int], torch.Tensor]:
    """Canonical rows [start, stop): stored rows, or stored columns of a transposed (Conv1D) weight."""
    from safetensors import safe_open

    def load(start: int, stop: int) -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as handle:
                part = handle.get_slice(name)
                t = part[:, start:stop] if transpose else part[start:stop]
        except Exception as err:  # safetensors raises its own error types
            raise SourceError(f"cannot read rows {start}:{stop} of tensor '{name}' from {path}: {err}") from err
        return t.t() if transpose else t

    return load


def _mark_file_ties(refs: list[WeightRef], config: dict[str, Any]) -> None:
    """A causal LM with tied embeddings saves the shared matrix once; say so on that row."""
    if not config.get("tie_word_embeddings", False):
        return
    archs = config.get("architectures") or []
    if not any("CausalLM" in a or "LMHead" in a for a in archs):
        return
    heads = [r for r in refs if module_type(r.name) == "lm_head"]
    embeds = [r for r in refs if module_type(r.name) == "embedding" and "position" not in r.name]
    if not embeds:
        return
    if heads:
        # both were saved: analyze the embedding, report the head as tied to it
        for h in heads:
            if h.shape == embeds[0].shape:
                refs.remove(h)
                embeds[0].tied_to += (h.name,)
    else:
        embeds[0].tied_to += ("lm_head.weight",)


# --- GGUF ---------------------------------------------------------------------------


def from_gguf(path: Path) -> WeightSource:
    """A GGUF file; quantized blocks are dequantized one tensor at a time with the gguf package."""
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:
        raise SourceError(f"cannot read GGUF file {path}: {err} (truncated or corrupt?)") from err
    refs: list[WeightRef] = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        if len(shape) < 2:
            continue

        def loader(t: Any = t, shape: tuple[int, ...] = shape) -> torch.Tensor:
            arr = dequantize(t.data, t.tensor_type)
            return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))

        refs.append(WeightRef(name=t.name, shape=shape, dtype=t.tensor_type.name, loader=loader))
    config: dict[str, Any] = {}
    try:
        config["architecture"] = reader.fields["general.architecture"].contents()
    except Exception:  # metadata is optional for analysis
        pass
    names = {r.name for r in refs}
    if "output.weight" not in names:
        for r in refs:
            if r.name == "token_embd.weight":
                r.tied_to = ("output.weight",)
    return WeightSource(identity=str(path), refs=refs, config=config)


def iter_matrices(source: WeightSource) -> Iterator[tuple[WeightRef, torch.Tensor]]:
    """Convenience for tests and small models: every matrix, loaded one at a time."""
    for ref in source.refs:
        if not ref.quantized:
            yield ref, ref.load()
