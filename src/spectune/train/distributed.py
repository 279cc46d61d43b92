"""FSDP2 for planned runs: config to Trainer settings, the launch checks, full weights for the analysis.

How a plan survives FSDP2 (``torch.distributed.fsdp.fully_shard``, which accelerate
applies for ``fsdp_version: 2``):

- **Names.** FSDP2 shards each parameter in place (it becomes a ``DTensor``, sharded on
  dim 0) and keeps every module and parameter name, so the plan's names match the model
  as under DDP. Wrappers that do rename (FSDP1's ``_fsdp_wrapped_module.``, activation
  checkpointing's ``_checkpoint_wrapped_module.``, ``torch.compile``'s ``_orig_mod.``) are
  removed before matching (``unwrapped_name``, used by ``spectune.plan.apply``).
- **Optimizer groups.** Under FSDP2 the Trainer builds the optimizer on the unsharded
  model, before wrapping; accelerate then swaps each group's parameter for its sharded
  ``DTensor``, keeping the group dict (name, lr, lr_scale, wd_scale). ``ShardedGroupsCheck``
  verifies at train begin that each named group holds the model's parameter of that name,
  so a rate cannot land on another matrix's shard unnoticed.
- **Analysis.** Re-planning and spectral tracking must see whole matrices, not a rank's
  rows. ``full_weights`` gathers every sharded parameter (``DTensor.full_tensor()``, a
  collective every rank joins in the same order) and shows the model with those full
  tensors for the duration of the analysis. Every rank then analyses identical weights;
  ``callbacks.agree_across_ranks`` still broadcasts rank 0's plan, so the ranks apply the
  same rates by construction.
- **CPU.** accelerate (1.15) attaches its FSDP plugin only to accelerator devices; CPU
  processes silently train with DDP instead. torch's FSDP2 itself runs on CPU over gloo, so
  with ``SPECTUNE_FSDP_CPU=1`` spectune sets the state accelerate would set on GPUs (the
  tests do this to run the FSDP path here); without it a CPU request is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainerCallback

from spectune.plan.apply import unwrapped_name

__all__ = [
    "CPU_OPT_IN",
    "FSDP_OPTIONS",
    "ShardedGroupsCheck",
    "check_fsdp_launch",
    "check_fsdp_options",
    "check_sharded_groups",
    "fsdp_arguments",
    "full_weights",
    "is_sharded",
    "settle_fsdp",
    "unwrapped_name",
]

CPU_OPT_IN = "SPECTUNE_FSDP_CPU"

# the fsdp_config keys a spectune config may set (all FSDP2 options of transformers' TrainingArguments that keep
# parameter names and whole-parameter optimizer groups); the rest are fixed by spectune
FSDP_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "transformer_layer_cls_to_wrap": (list, str),
    "reshard_after_forward": bool,
    "cpu_offload": bool,
}

_NOT_OFFERED = {
    "version": "spectune runs FSDP2 only: FSDP1 flattens each wrapped unit into one 1-D FlatParameter, so a "
    "matrix has no parameter of its own to take a rate, and shards look 1-D (no weight decay)",
    "activation_checkpointing": "activation checkpointing wraps each layer in a CheckpointWrapper, which renames "
    "its parameters (_checkpoint_wrapped_module.); plans written during the run would carry those names",
    "state_dict_type": "spectune saves the final model as one safetensors folder (FULL_STATE_DICT)",
}


def check_fsdp_options(options: dict[str, Any], distributed: str = "fsdp") -> dict[str, Any]:
    """The ``train.fsdp_config`` options, checked: known keys with the right types, and only under fsdp.

    Checked when the config is read (on any machine), so a typo fails before a job
    waits for GPUs; the hardware itself is checked at launch (``check_fsdp_launch``).
    """
    if options and distributed != "fsdp":
        raise ValueError(f"fsdp_config is set ({', '.join(sorted(options))}) but train.distributed is {distributed}; "
                         "set train.distributed: fsdp or drop fsdp_config")
    for key, value in options.items():
        if key in _NOT_OFFERED:
            raise ValueError(f"fsdp_config.{key} cannot be set: {_NOT_OFFERED[key]}")
        if key not in FSDP_OPTIONS:
            raise ValueError(f"fsdp_config.{key} is not an FSDP option spectune passes on; use "
                             + ", ".join(FSDP_OPTIONS))
        if not isinstance(value, FSDP_OPTIONS[key]) or (isinstance(value, list) and not all(isinstance(x, str) for x in value)):
            want = "a layer class name or a list of them" if key == "transformer_layer_cls_to_wrap" else "true or false"
            raise ValueError(f"fsdp_config.{key} must be {want}, not {value!r}")
    return options


def fsdp_arguments(distributed: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``TrainingArguments`` keywords for ``train.distributed`` (none for ddp).

    FSDP2 with transformer-block wrapping: each layer class named in
    ``transformer_layer_cls_to_wrap`` (default ``wrap_classes``, set once the model is
    known, in ``settle_fsdp``) becomes one FSDP unit; accelerate makes the input
    embedding another, and the root holds the rest. The final model is saved as a
    full state dict, gathered to rank 0.
    """
    if distributed != "fsdp":
        return {}
    config = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
              **check_fsdp_options(dict(options or {}))}
    return {"fsdp": True, "fsdp_config": config}


def cpu_opt_in() -> bool:
    """Whether this process may run FSDP2 on CPU (``SPECTUNE_FSDP_CPU=1``): see the module's notes."""
    return os.environ.get(CPU_OPT_IN, "").strip().lower() in ("1", "true", "yes")


CPU_REASON = (
    "FSDP cannot run on CPU processes through the Trainer: accelerate attaches its FSDP plugin only to "
    "accelerator devices (CUDA, XPU, NPU, ...), so CPU processes would silently train with DDP instead. Use "
    f"train.distributed: ddp on CPU, or set {CPU_OPT_IN}=1 to run torch's FSDP2 over gloo anyway (spectune then "
    "sets the accelerate state it would set on GPUs; accelerate does not support this, spectune's tests use it)"
)


def check_fsdp_launch(distributed: str) -> None:
    """Refuse, before a model is loaded, an FSDP run that would not shard: no launcher, or CPU without the opt-in.

    Started without a launcher, accelerate sees one plain process and would drop the
    FSDP plugin silently; on CPU it does so even under a launcher.
    """
    if distributed != "fsdp":
        return
    if "LOCAL_RANK" not in os.environ:
        raise ValueError("train.distributed=fsdp needs a distributed launcher: torchrun --nproc_per_node N -m "
                         "spectune.cli train cfg.yaml, or accelerate launch (N=1 on one GPU works); started without one, "
                         "the Trainer would train one unsharded process")
    if not torch.cuda.is_available() and not cpu_opt_in():
        raise ValueError(f"train.distributed=fsdp: {CPU_REASON}")


def settle_fsdp(trainer: Any) -> None:
    """After the Trainer's accelerator exists: FSDP2 as requested, or a clear error instead of another strategy.

    Refuses FSDP1 (from ``accelerate launch --use_fsdp --fsdp_version 1`` or its
    config): its flat parameters cannot carry per-matrix rates. On CPU with the opt-in,
    sets the FSDP state exactly as accelerate sets it on GPUs (``AcceleratorState``
    and ``PartialState`` both say FSDP; the plugin takes the mixed precision), which
    accelerate's device check skips for CPU; the Trainer's own flags follow.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is not None:
        if plugin.fsdp_version != 2:
            raise ValueError(f"FSDP version {plugin.fsdp_version}: {_NOT_OFFERED['version']}; launch with "
                             "fsdp_version 2 (or set train.distributed: fsdp)")
        _set_wrap_classes(plugin, trainer.model)
        return
    if not trainer.args.fsdp:
        return
    if trainer.accelerator.device.type != "cpu" or not cpu_opt_in():
        reason = CPU_REASON if trainer.accelerator.device.type == "cpu" else (
            f"accelerate did not enable FSDP (distributed type {state.distributed_type}); start under a launcher")
        raise RuntimeError(f"train.distributed=fsdp: {reason}")
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"train.distributed=fsdp with {CPU_OPT_IN}=1 needs CPU processes under a launcher "
                           f"(accelerate reports {state.distributed_type})")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    _set_wrap_classes(plugin, trainer.model)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ does
    trainer.is_fsdp_enabled = True


def _embedding_holders(model: torch.nn.Module) -> set[str]:
    """Class names of the modules that contain the model's input embedding (itself included)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return set()
    return {type(m).__name__ for m in model.modules() if any(x is emb for x in m.modules())}


def wrap_classes(model: torch.nn.Module) -> list[str]:
    """The layer classes that become FSDP units by default: the model's ``_no_split_modules`` less any class
    that holds the input embedding.

    accelerate (1.15) shards the input embedding as a unit of its own after auto-wrapping;
    if a wrapped class already holds it (BERT's ``BertEmbeddings``, in BERT's
    ``_no_split_modules``), its weight is a DTensor by then and ``fully_shard`` fails
    inside torch (``DeviceMesh._concatenate``: "value was None"). Leaving that class to
    the root unit changes nothing else: the embedding is still its own unit.
    """
    holders = _embedding_holders(model)
    return sorted(n for n in (getattr(model, "_no_split_modules", None) or []) if n not in holders)


def _set_wrap_classes(plugin: Any, model: torch.nn.Module) -> None:
    """Default wrap classes for transformer-block wrapping (``wrap_classes``); refuses a given list that would fail."""
    names = plugin.transformer_cls_names_to_wrap
    if names is None:
        plugin.transformer_cls_names_to_wrap = wrap_classes(model)
        return
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)  # env: "A,B"
    clash = sorted(set(names) & _embedding_holders(model))
    if clash:
        raise ValueError(f"fsdp_config.transformer_layer_cls_to_wrap: {', '.join(clash)} holds the input embedding, "
                         "which accelerate shards as a unit of its own; wrapping it too fails in fully_shard. Leave "
                         f"it out (default for this model: {', '.join(wrap_classes(model)) or 'no class'})")


# --- sharded parameters -------------------------------------------------------------------------


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 or tensor parallel)."""
    dtensor = _dtensor()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


@contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with every sharded parameter replaced by its full tensor, on every rank, inside the block.

    An analysis of a sharded model would read each rank's rows of every matrix: other
    spectra on each rank, and plans that differ between ranks. Here each ``DTensor``
    is gathered with ``full_tensor()`` (all ranks must enter the block together: it is
    a collective per parameter, in the same module order everywhere) from the sharded
    float32 master weights, so mixed precision's compute copies are not what is read.
    A parameter shared by two modules (tied embeddings) becomes one full tensor, so
    ties are still seen as ties. The sharded parameters are put back on exit, before
    any forward pass; the block holds a whole copy of the weights on each rank.

    FSDP2 modules are resharded first: after a forward without backward (evaluation)
    the root module keeps its unsharded parameters registered, which would otherwise be
    read in the compute dtype. A model without ``DTensor`` parameters passes through.
    """
    dtensor = _dtensor()
    if dtensor is None or not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    full: dict[int, torch.nn.Parameter] = {}
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if not isinstance(param, dtensor):
                        continue
                    if id(param) not in full:
                        full[id(param)] = torch.nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                    swapped.append((module, name, param))
                    module._parameters[name] = full[id(param)]
        yield model
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param


def check_sharded_groups(model: torch.nn.Module, optimizer: Any) -> int:
    """How many named optimizer groups hold exactly the model's parameter of their name; raises on any other.

    Under FSDP2 accelerate replaces the optimizer's parameters after the groups were
    built (matching them by name and storage); a group left with the unsharded tensor
    would train nothing, and one holding another parameter would train it at the wrong
    rate. Both are errors here, before the first step.
    """
    params = {unwrapped_name(n): p for n, p in model.named_parameters()}
    bad: list[str] = []
    checked = 0
    for group in optimizer.param_groups:
        name = group.get("name")
        if name is None:
            continue
        held = group["params"]
        want = params.get(unwrapped_name(name))
        if want is None or len(held) != 1 or held[0] is not want:
            bad.append(name)
        checked += 1
    if bad:
        raise RuntimeError(f"{len(bad)} of {checked} optimizer groups do not hold the model parameter they are named "
                           f"after (first: {', '.join(bad[:3])}): the plan's rates would land on other parameters")
    return checked


class ShardedGroupsCheck(TrainerCallback):
    """At train begin, after accelerate has sharded the model and swapped the optimizer's parameters:
    every plan group holds its own (sharded) parameter (``check_sharded_groups``)."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kw: Any) -> None:
        if model is not None and optimizer is not None:
            self.checked = check_sharded_groups(model, optimizer)

