"""The Hugging Face Trainer as spectune runs it: plan optimizer groups, a kind's hooks, bounded LM evaluation.

``SpectralTrainer`` is what every recipe builds (the preference recipe through TRL's
subclasses); ``training_arguments`` turns a config into the Trainer's arguments.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import speed_metrics

from spectune.train import callbacks as cb
from spectune.train.config import TrainConfig
from spectune.train.evaluate import evaluate_lm


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving the global random streams (Python, NumPy, torch CPU and CUDA).

    The training draws from the global streams (the data loader's worker seed each epoch,
    dropout in every step). Evaluation (its data loader draws a seed; a model left with
    dropout would draw more), logging and the spectral analysis run between steps; inside
    this block what they draw is given back afterwards, so the training's draws are the
    same whatever they do. Checkpoints save the global state between steps, which is then
    exactly the training's, so a resumed run continues the same streams.
    """
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class IsolatedCallbackHandler(CallbackHandler):
    """Every callback event runs in ``isolated_rng``: re-planning, spectral tracking, logging and a user's
    callbacks cannot shift the training's random draws (a seed fixes the training whatever they do)."""

    @classmethod
    def replacing(cls, handler: CallbackHandler) -> "IsolatedCallbackHandler":
        new = cls(handler.callbacks, handler.model, handler.processing_class, handler.optimizer, handler.lr_scheduler)
        new.train_dataloader, new.eval_dataloader = handler.train_dataloader, handler.eval_dataloader
        return new

    def call_event(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        with isolated_rng():
            return super().call_event(event, args, state, control, **kwargs)


SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_tokens_per_second")


class SpectralTrainer(Trainer):
    """A Trainer whose optimizer groups come from a plan, which stops on a non-finite loss, whose
    causal-LM evaluation is per-token NLL in bounded memory, and whose evaluation and callbacks
    leave the training's random streams untouched."""

    def __init__(self, *args: Any, group_fn: Any = None, guard: cb.StopOnNonFinite | None = None,
                 lm_eval: bool = False, chunk_bytes: int = 64 * 2**20, fused: str = "auto", method: Any = None,
                 method_config: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.group_fn = group_fn
        self.method = method  # the kind's registry entry: its optimizer and training-step hooks, where it has them
        self.method_config = method_config
        self.guard = guard
        self.initial_scale = 1.0  # parameter-weighted mean rate scale of the first optimizer groups
        self.lm_eval = lm_eval
        self.chunk_bytes = chunk_bytes
        self.fused = fused
        self.callback_handler = IsolatedCallbackHandler.replacing(self.callback_handler)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from spectune.train.distributed import settle_fsdp

        settle_fsdp(self)  # FSDP2 as asked (also on CPU processes with SPECTUNE_FSDP_CPU=1), never FSDP1 or a silent DDP

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        # built here (not passed in) so accelerate/FSDP see the wrapped model's own parameters
        hook = getattr(self.method, "optimizer", None)
        if self.optimizer is None and (self.group_fn is not None or hook is not None):
            opt_model = self.model if model is None else model
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs.pop("lr", None)
            groups = self.group_fn(opt_model) if self.group_fn is not None else self.default_groups(opt_model)
            if hook is not None:  # the kind's own optimizer (LoRA+, GaLore, ...) over the same groups
                self.optimizer = hook(opt_model, groups, self.args.learning_rate, kwargs, self.method_config)
            else:
                self.optimizer = cls(groups, lr=self.args.learning_rate, **kwargs)
            self.initial_scale = cb.weighted_scale(self.optimizer.param_groups)
            return self.optimizer
        return super().create_optimizer(model)

    def default_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """The Trainer's own grouping without a plan: weight decay on all but biases and norms."""
        decay = set(self.get_decay_parameter_names(model))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in params if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        step = getattr(self.method, "training_step", None)
        if step is not None:  # a kind that does not step by backprop (zeroth-order): its own step
            loss = step(self, model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None and self.guard.bad_step is None and not torch.isfinite(loss.detach()).all():
            self.guard.bad_step = self.state.global_step + 1
        return loss

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluation that draws nothing from the training's random streams; per-token NLL for causal LM."""
        with isolated_rng():
            if not self.lm_eval or isinstance(eval_dataset, dict):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            return self._evaluate_lm(eval_dataset, metric_key_prefix)

    def _evaluate_lm(self, eval_dataset: Any, prefix: str) -> dict[str, float]:
        """``evaluate_lm`` over the Trainer's own evaluation loader (sharded across processes), logged like
        the Trainer's evaluation: ``{prefix}_loss`` is the mean NLL per predicted token, not per batch."""
        loader = self.get_eval_dataloader(eval_dataset)
        start = time.time()
        result = evaluate_lm(self.model, (self._prepare_inputs(b) for b in loader),
                             gather=self.accelerator.gather_for_metrics, context=self.autocast_smart_context_manager,
                             chunk_bytes=self.chunk_bytes, fused=self.fused)
        metrics: dict[str, Any] = result.metrics(prefix)
        metrics.update(speed_metrics(prefix, start, num_samples=result.rows, num_steps=len(loader),
                                     num_tokens=result.tokens))
        metrics[f"{prefix}_method"] = result.method
        self.log({k: v for k, v in metrics.items() if not isinstance(v, str)})
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def training_arguments(cfg: TrainConfig, output_dir: Path, total_steps: int, world: int = 1) -> TrainingArguments:
    """The Trainer's arguments for a config: one place, shared with the overhead benchmark's plain Trainer."""
    from spectune.train.distributed import fsdp_arguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        warmup_steps=int(cfg.train.warmup_ratio * total_steps),
        lr_scheduler_type=cfg.train.scheduler,
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        bf16=cfg.train.bf16,
        eval_strategy=cfg.eval.every,
        eval_steps=cfg.eval.every_steps or None,
        save_strategy=cfg.output.save_every,
        save_steps=cfg.output.save_every_steps or None,
        save_total_limit=cfg.output.save_total_limit,
        logging_strategy="steps",
        logging_steps=cfg.logging.every_steps,
        logging_nan_inf_filter=False,
        report_to=["tensorboard"] if cfg.logging.tensorboard and _has_tensorboard() else [],
        disable_tqdm=not cfg.logging.progress,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,
        dataloader_num_workers=0,
        **fsdp_arguments(cfg.train.distributed, cfg.train.fsdp_config),  # FSDP2 under train.distributed: fsdp
    )


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        return False

