"""What every method kind shares: the objective settings, the spec a kind registers, and the build context.

A kind is one module under ``spectune.train.methods`` holding its own typed config
(only its own fields, so a key of another kind is an error by type), how it builds
on a model, and what a plan may set for it. The registry in ``__init__`` collects
them the way ``plan.policies.POLICIES`` collects policies (peft's
``register_peft_method`` is the anchor).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from spectune.plan import Plan, apply_trainable

# what a plan may decide for a kind: per-matrix rates, per-module sizes (ranks), and the set of matrices that train
RATES, RANKS, TRAINABLE = "rates", "ranks", "trainable"
# linear layers inside the blocks, by the names the common families use
DEFAULT_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query|key|value|dense|c_attn|c_proj|c_fc)$"
HEAD_NAMES = ("classifier", "score", "pre_classifier")  # new task heads, by the names the common families use

# the losses TRL 1.x's DPOTrainer and CPOTrainer accept (checked here so a typo fails before a model is loaded)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
KTO_LOSS_TYPES = ("sigmoid", "kto", "apo_zero_unpaired")  # sigmoid (the default) and kto name TRL's KTO loss
Objective = Literal["sft", "dpo", "orpo", "cpo", "simpo", "kto"]


class MethodBase(BaseModel):
    """Settings every kind reads: what the run optimises (the objective and its preference settings) and the head."""

    model_config = ConfigDict(extra="forbid")

    train_head: bool = Field(True, description="keep a new task head (classifier) trainable when the base is frozen")
    objective: Objective = Field(
        "sft", description="what the run optimises: sft (next-token loss on the data's text or responses) or a "
        "preference objective on prompt/chosen/rejected pairs through TRL's trainers: dpo (with loss_type: sigmoid, "
        "ipo, hinge, robust, ...), orpo (odds ratio, no reference model), cpo, simpo (CPO's reference-free SimPO loss), "
        "kto (TRL's KTOTrainer on unpaired rows: each pair's chosen reply desirable, its rejected one undesirable)")
    beta: float | None = Field(
        None, gt=0, description="preference strength: dpo/cpo temperature, orpo's lambda, simpo's reward scale; "
        "None = TRL's default for the objective (0.1; simpo 2.0)")
    loss_type: list[str] | str = Field(
        "sigmoid", description="dpo: one of TRL's DPO losses or a list of them (summed with loss_weights); cpo: "
        "sigmoid, hinge or ipo; kto: kto (= sigmoid, the default) or apo_zero_unpaired; orpo and simpo have their "
        "own loss and take the default")
    loss_weights: list[float] | None = Field(None, description="dpo: weight of each loss_type when several are given")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo/cpo: probability a preference label is "
                                   "flipped (robust DPO, conservative DPO)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin over beta (gamma/beta ratio)")
    cpo_alpha: float = Field(1.0, ge=0, description="cpo: weight of the NLL term on the chosen replies")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (chosen) rows' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable (rejected) rows' loss")

    @model_validator(mode="after")
    def _preference(self) -> "MethodBase":
        """A loss type TRL would only reject at the first training step is refused here, with the choices."""
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        allowed = {"dpo": DPO_LOSS_TYPES, "cpo": CPO_LOSS_TYPES, "kto": KTO_LOSS_TYPES}.get(self.objective, ("sigmoid",))
        bad = [x for x in losses if x not in allowed]
        if not losses or bad:
            if self.objective in ("dpo", "cpo", "kto"):
                raise ValueError(f"loss_type {bad or losses!r} is not a {self.objective} loss; use " + ", ".join(allowed))
            raise ValueError(f"loss_type {self.loss_type!r}: objective {self.objective} has its own loss; leave "
                             "loss_type unset (it applies to dpo and cpo)")
        if len(losses) > 1 and self.objective != "dpo":
            raise ValueError("a list of loss_type values (a weighted sum) is for objective dpo")
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(losses)} loss_type values")
        if self.objective == "dpo" and "exo_pair" in losses and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        return self


class TargetedBase(MethodBase):
    """Kinds that adapt chosen linear layers (the PEFT tuners): which ones."""

    target_modules: list[str] | str | None = Field(None, description="None: every attention/MLP linear of the blocks")


@dataclass
class BuildContext:
    """What a kind may read when it builds on a model, besides its own config.

    ``train_batches`` yields collated training batches (for the data-driven
    initialisations); ``run_dir`` is where a kind records what it did.
    """

    task: str
    plan: Plan | None
    total_steps: int
    heads: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    seed: int = 0
    train_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # what a kind's build computed once for its callbacks


@dataclass(frozen=True)
class Method:
    """One method kind: its config, how it builds, what a plan may set, and its optional hooks into the run.

    Hooks (all optional, each a plain function):
      ``load_kwargs(cfg, task, device)``: extra ``from_pretrained`` arguments (4-bit loading);
      ``callbacks(cfg, ctx)``: Trainer callbacks the kind needs during training;
      ``optimizer(model, groups, lr, kwargs, cfg)``: the optimizer over the run's groups (LoRA+, GaLore, ...);
      ``training_step(trainer, model, inputs)``: a step other than backprop (zeroth-order methods).
    """

    kind: str
    config: type[MethodBase]
    build: Callable[[torch.nn.Module, Any, BuildContext], torch.nn.Module]
    plan_sets: frozenset[str]
    trains: str  # what trains, in a few words (for messages and the docs' table of kinds)
    memory: str
    paper: str
    library: str
    mergeable: bool = False  # final/ can become a plain model folder (adapters merged; a full run already is one)
    load_kwargs: Callable[[Any, str, str], dict[str, Any]] | None = None
    callbacks: Callable[[Any, BuildContext], list[Any]] | None = None
    optimizer: Callable[..., torch.optim.Optimizer] | None = None
    training_step: Callable[..., torch.Tensor] | None = None


def task_type(task: str) -> str:
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


def head_modules(model: torch.nn.Module, task: str) -> list[str]:
    """Freshly initialised task heads that must train even when the base is frozen."""
    if task != "classification":
        return []
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    return [h for h in HEAD_NAMES if h in names]


def default_targets(model: torch.nn.Module) -> list[str]:
    """Every attention/MLP linear inside the transformer blocks (not the pooler or the head), and GPT-2's Conv1D."""
    pattern = re.compile(DEFAULT_TARGETS)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and pattern.match(n) and re.search(r"\.(layer|layers|h)\.\d+\.", n)]
    try:
        from transformers.pytorch_utils import Conv1D

        names += [n for n, m in model.named_modules() if isinstance(m, Conv1D) and pattern.match(n)]
    except ImportError:  # pragma: no cover
        pass
    return sorted(set(names))


def targets(model: torch.nn.Module, cfg: TargetedBase) -> list[str] | str:
    return cfg.target_modules if cfg.target_modules is not None else default_targets(model)


def peft_common(ctx: BuildContext) -> dict[str, Any]:
    """The settings every PEFT config of a run shares: the task type and the heads that train in full."""
    common: dict[str, Any] = {"task_type": task_type(ctx.task)}
    if ctx.heads:
        common["modules_to_save"] = ctx.heads
    return common


def train_planned_matrices(model: torch.nn.Module, plan: Plan) -> None:
    """Matrices the plan trains in full; the rest of the plan's matrices are frozen (adapters and heads keep training)."""
    adapters = {n for n, p in model.named_parameters() if p.requires_grad and ("lora_" in n or "modules_to_save" in n)}
    apply_trainable(model, plan)
    for n, p in model.named_parameters():
        if n in adapters:
            p.requires_grad_(True)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
