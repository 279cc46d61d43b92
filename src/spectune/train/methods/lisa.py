"""LISA (Pan et al., NeurIPS 2024, arXiv:2403.17919): full-parameter training with the transformer blocks sampled.

The embeddings, the head and the norms outside the blocks (``always_train``) train
at every step; of the blocks, ``layers`` (the paper's gamma) train at a time and the
rest are frozen, redrawn every ``interval_steps`` (K) optimizer steps. Frozen blocks
have ``requires_grad`` off, so autograd allocates no gradient for them.

Memory is the point, so the optimizer keeps no state for a block outside the active
set: at each new interval the state of every block is dropped, and a block drawn
again starts from fresh moments too. That is what the paper's own runs did (each
interval a separate run, saved and reloaded: the authors in LMFlow issue 729) and what
LMFlow's ``LISATrainer`` does (it rebuilds the optimizer at each switch and carries over
only the always-trained groups' state). Keeping old blocks' state instead (LMFlow's first
callback, issues 726/768/778, ms-swift 1056) lets the state climb towards full
fine-tuning's as more blocks have been active; dropping it bounds the state by
``always_train`` plus gamma blocks, whatever ran before.

Which blocks train is drawn from ``numpy.random.default_rng([train.seed, interval])``:
a pure function of the seed and the interval index, so a resumed run continues the
same sequence without any stored random state. ``sampling: plan`` draws block b with
probability proportional to s_b (``prefer-high``) or 1/s_b (``prefer-low``), s_b the
parameter-weighted mean rate scale of the block's matrices in the run's rate plan
(docs/metrics.md, "LISA block sampling"); the probabilities come from the run's first
plan (a re-plan between epochs changes the rates, not the draw). ``sampling: outliers``
draws in proportion to OwLore's outlier ratio of each block (``lisa_outliers``), computed
once from the base weights and the run's first training batches. The active blocks of
each interval are appended to ``lisa_blocks.jsonl`` in the run folder, and the scores and
probabilities of a non-uniform draw are in ``lisa_sampling.json``. Tested in one process.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from transformers import TrainerCallback

from spectune import _io
from spectune.analyze.naming import layer_index, module_type
from spectune.plan import Plan, match_names
from spectune.train.methods.base import RATES, BuildContext, Method, MethodBase
from spectune.train.methods.lisa_outliers import block_outlier_ratios

ALWAYS = ("embeddings", "head", "norms")
BLOCKS_FILE = "lisa_blocks.jsonl"
SAMPLING_FILE = "lisa_sampling.json"  # each block's score and probability, when the draw is not uniform


class LisaConfig(MethodBase):
    kind: Literal["lisa"] = "lisa"
    layers: int = Field(2, ge=1, description="gamma: transformer blocks that train at a time (LMFlow's default 2)")
    interval_steps: int = Field(20, description="K: optimizer steps between draws of the active blocks (LMFlow: 20)")
    always_train: list[Literal["embeddings", "head", "norms"]] = Field(
        default_factory=lambda: list(ALWAYS),
        description="what trains at every step besides the sampled blocks: the input embeddings, the head (LM head "
        "or pooler; a tied head is the embedding matrix and trains if either is listed) and the norms outside the "
        "blocks; LISA's default is all three. A new task head (classifier) trains whenever train_head is on")
    sampling: Literal["uniform", "plan", "outliers"] = Field(
        "uniform", description="uniform (LISA); plan: block b drawn in proportion to its planned rate scale s_b; "
        "outliers: to its outlier ratio from weights and calibration activations (OwLore)")
    direction: Literal["prefer-high", "prefer-low"] = Field(
        "prefer-high", description="sampling plan or outliers: p_b proportional to the block's score s_b "
        "(prefer-high; OwLore under outliers) or to 1/s_b (prefer-low)")
    outlier_threshold: float = Field(13.0, gt=1, description="sampling outliers: M, an entry of |W| ||X|| is an "
                                     "outlier above M times the block's mean (OwLore's released scores use 13)")
    calibration_batches: int = Field(8, ge=1, description="sampling outliers: training batches whose activations "
                                     "give the input norms")

    @field_validator("interval_steps")
    @classmethod
    def _interval(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"method.interval_steps={v}: LISA redraws the active blocks every interval_steps "
                             "optimizer steps; use 1 or more")
        return v

    @field_validator("always_train")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return sorted(set(v), key=ALWAYS.index)


@dataclass
class Layout:
    """The model's parameters as LISA sees them: per block, always trained, and frozen throughout."""

    blocks: list[list[torch.nn.Parameter]]
    block_ids: list[int]  # the block indices as the model names them (layers.<i>)
    always: list[torch.nn.Parameter]
    probabilities: np.ndarray  # p_b of each block (uniform: 1/B)

    def block_params(self) -> list[torch.nn.Parameter]:
        return [p for ps in self.blocks for p in ps]


def outside_kind(name: str) -> str:
    """Which ``always_train`` part a parameter outside the blocks belongs to: embeddings, norms or head."""
    if module_type(name) == "embedding":
        return "embeddings"
    if "norm" in name.lower() or ".ln_" in f".{name}":
        return "norms"
    return "head"


def layout(model: torch.nn.Module, cfg: LisaConfig, ctx: BuildContext) -> Layout:
    """The blocks, the always-trained parameters and the sampling probabilities; refuses what cannot be sampled."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(out.weight)} if out is not None and getattr(out, "weight", None) is not None else set()
    heads = tuple(f"{h}." for h in ctx.heads)
    by_block: dict[int, list[torch.nn.Parameter]] = {}
    always: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        b = layer_index(name)
        if b is not None:
            by_block.setdefault(b, []).append(p)
            continue
        parts = {outside_kind(name)} | ({"head"} if id(p) in head_ids else set())
        if parts & set(cfg.always_train) or name.startswith(heads):
            always.append(p)
    if not by_block:
        raise ValueError("method.kind=lisa samples transformer blocks, but no parameter name has a block index "
                         "(layers.<i>, layer.<i>, h.<i>)")
    ids = sorted(by_block)
    if cfg.layers > len(ids):
        raise ValueError(f"method.layers={cfg.layers} is more than the model's {len(ids)} transformer blocks")
    probs = np.full(len(ids), 1.0 / len(ids))
    if cfg.sampling != "uniform":
        if "lisa_scores" not in ctx.notes:  # computed once, at build: the callback's layout reads it back
            ctx.notes["lisa_scores"] = (block_scales(model, ctx.plan, ids) if cfg.sampling == "plan"
                                        else outlier_scores(model, ids, cfg, ctx))
        probs = block_probabilities(ctx.notes["lisa_scores"], cfg.direction, cfg.layers)
    return Layout(blocks=[by_block[b] for b in ids], block_ids=ids, always=always, probabilities=probs)


def outlier_scores(model: torch.nn.Module, ids: list[int], cfg: LisaConfig, ctx: BuildContext) -> np.ndarray:
    """OwLore's LOD per block (``lisa_outliers``) from the run's first ``calibration_batches`` training batches."""
    if ctx.train_batches is None:
        raise ValueError("method.sampling=outliers reads activations from the run's training batches, and this run "
                         "collates none (a preference objective's pairs are tokenized inside TRL's trainer); use "
                         "sampling uniform or plan")
    batches = [dict(b) for b in itertools.islice(iter(ctx.train_batches()), cfg.calibration_batches)]
    scores = block_outlier_ratios(model, ids, batches, cfg.outlier_threshold)
    if (scores > 0).sum() < cfg.layers:
        raise ValueError(f"method.sampling=outliers: only {int((scores > 0).sum())} of {len(ids)} blocks have an entry "
                         f"of |W| ||X|| above method.outlier_threshold={cfg.outlier_threshold:g} times their mean, too "
                         f"few to draw method.layers={cfg.layers} from; lower the threshold, or sample uniform")
    return scores


def block_scales(model: torch.nn.Module, plan: Plan | None, ids: list[int]) -> np.ndarray:
    """s_b: the parameter-weighted mean rate scale of block b's matrices under the plan (a matrix it omits: 1)."""
    if plan is None:
        raise ValueError("method.sampling=plan draws blocks by their planned rates, but the run has no plan: set "
                         "plan.policy (a rate policy such as alpha-balance) or use method.sampling=uniform")
    if not plan.lr_scale:
        raise ValueError(f"method.sampling=plan reads per-matrix rates, but the plan (policy {plan.policy}) sets "
                         "none; use a rate policy (alpha-balance, phased, ...)")
    names = [n for n, _ in model.named_parameters()]
    scale = {m: plan.lr_scale[k] for k, m in match_names(list(plan.lr_scale), names).items()}
    weighted = np.zeros(len(ids))
    sizes = np.zeros(len(ids))
    where = {b: i for i, b in enumerate(ids)}
    for n, p in model.named_parameters():
        b = layer_index(n)
        if b is None or p.ndim < 2:
            continue
        weighted[where[b]] += p.numel() * scale.get(n, 1.0)
        sizes[where[b]] += p.numel()
    return weighted / np.maximum(sizes, 1)


def block_probabilities(scales: np.ndarray, direction: str, gamma: int) -> np.ndarray:
    """p_b proportional to s_b (prefer-high) or 1/s_b (prefer-low); a block the plan does not train (s_b = 0) gets 0."""
    s = np.asarray(scales, dtype=float)
    live = s > 0
    if live.sum() < gamma:
        raise ValueError(f"method.layers={gamma}: only {int(live.sum())} blocks score above 0 (a plan's rate, or "
                         "an outlier ratio), too few to draw from")
    w = np.where(live, s if direction == "prefer-high" else 1.0 / np.where(live, s, 1.0), 0.0)
    return w / w.sum()


def draw(seed: int, interval: int, probabilities: np.ndarray, gamma: int) -> list[int]:
    """The positions of the blocks active in ``interval``: gamma drawn without replacement, p_b each draw among the
    rest (numpy's ``Generator.choice``); a pure function of the seed and the interval index."""
    rng = np.random.default_rng([seed, interval])
    return sorted(int(i) for i in rng.choice(len(probabilities), size=gamma, replace=False, p=probabilities))


def inner_optimizer(optimizer: Any) -> Any:
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer holds the real one
    return optimizer


class LisaSampler(TrainerCallback):
    """Draws the active blocks at each interval's first step, freezes the rest and drops their optimizer state."""

    def __init__(self, cfg: LisaConfig, ctx: BuildContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.layout: Layout | None = None
        self.interval: int | None = None
        self.active: list[int] = []
        self.recorded: set[int] = set()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kw: Any) -> None:
        self.layout = layout(model, self.cfg, self.ctx)
        self.interval = None  # a resumed run keeps the state its checkpoint restored for the current interval
        self.recorded = self._read_recorded()
        self._maybe_switch(state, optimizer)

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        self._maybe_switch(state, optimizer)

    def _maybe_switch(self, state: Any, optimizer: Any) -> None:
        assert self.layout is not None
        interval = state.global_step // self.cfg.interval_steps
        if interval == self.interval:
            return
        fresh = self.interval is not None  # a new interval mid-run: every block starts from fresh moments
        self.interval = interval
        self.active = draw(self.ctx.seed, interval, self.layout.probabilities, self.cfg.layers)
        opt = inner_optimizer(optimizer) if optimizer is not None else None
        for i, params in enumerate(self.layout.blocks):
            on = i in self.active
            for p in params:
                p.requires_grad_(on)
                p.grad = None
                if opt is not None and (fresh or not on):
                    opt.state.pop(p, None)
        if state.is_world_process_zero:
            self._record(interval, state.global_step)

    def _read_recorded(self) -> set[int]:
        path = self._path()
        if path is None or not path.exists():
            return set()
        return {json.loads(line)["interval"] for line in path.read_text().splitlines() if line.strip()}

    def _path(self) -> Path | None:
        return None if self.ctx.run_dir is None else Path(self.ctx.run_dir) / BLOCKS_FILE

    def _record(self, interval: int, step: int) -> None:
        path = self._path()
        if path is None or interval in self.recorded:
            return
        assert self.layout is not None
        with path.open("a") as f:
            f.write(json.dumps({"interval": interval, "first_step": interval * self.cfg.interval_steps,
                                "blocks": [self.layout.block_ids[i] for i in self.active]}) + "\n")
        self.recorded.add(interval)


def build(model: torch.nn.Module, cfg: LisaConfig, ctx: BuildContext) -> torch.nn.Module:
    """Every block and the always-trained parameters trainable (so the optimizer holds them all from the start;
    the sampler freezes the inactive blocks at the first step), everything else frozen."""
    if ctx.plan is not None and ctx.plan.trainable is not None:
        raise ValueError(f"plan.policy={ctx.plan.policy} decides the trainable set, but method.kind=lisa samples it; "
                         "use a rate policy, or method.kind=full")
    lay = layout(model, cfg, ctx)
    if ctx.run_dir is not None and cfg.sampling != "uniform":
        _io.write_json(Path(ctx.run_dir) / SAMPLING_FILE, {
            "sampling": cfg.sampling, "direction": cfg.direction, "blocks": lay.block_ids,
            "scores": [float(x) for x in ctx.notes["lisa_scores"]],
            "probabilities": [float(x) for x in lay.probabilities]})
    model.requires_grad_(False)
    for p in lay.block_params() + lay.always:
        p.requires_grad_(True)
    return model


METHOD = Method(kind="lisa", config=LisaConfig, build=build, plan_sets=frozenset({RATES}),
                trains="every block in turn (gamma at a time) plus embeddings, head and norms",
                memory="weights + gradients and AdamW state of gamma blocks and the always-trained parameters",
                paper="arXiv:2403.17919", library="torch (LMFlow's LISA as a callback)", mergeable=True,
                callbacks=lambda cfg, ctx: [LisaSampler(cfg, ctx)])
