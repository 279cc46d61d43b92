"""What a run costs, measured from inside the Trainer: time per optimizer step and optimizer-state size.

Memory is what separates LoRA, QLoRA, LISA, GaLore and full fine-tuning, and time per
step what a budget of GPU hours buys; a comparison weighs quality against both. The
numbers are measured, not derived from a formula, so a method that keeps less state
(an 8-bit or factored optimizer, a frozen base) shows it as it is:

- ``seconds_per_step``: mean wall time of one optimizer step, from ``on_step_begin`` to
  ``on_optimizer_step`` (the forward and backward passes of its micro-batches, gradient
  clipping and the optimizer update; not data loading, logging, checkpointing or
  evaluation), **excluding the first step** of each ``train()`` call, which pays for
  lazy allocations, kernel selection and the optimizer's state creation. With CUDA
  the device is synchronised at both ends, so queued kernels are counted. A run of a
  single step reports that step.
- ``optimizer_state_parameters``: elements of every tensor in ``optimizer.state`` at
  the end of training (``spectune._memory.optimizer_state_numel``), and
  ``optimizer_state_mb`` their bytes.
- ``trainable_parameters_active``: the most parameters that took a step at once: at each
  optimizer step, the elements of the parameters with ``requires_grad``. A method that
  trains a subset at a time (LISA's active blocks) shows that subset, where the run's
  ``trainable_parameters`` counts everything it may train; for the rest the two agree.
- ``peak_gpu_memory_mb``: ``torch.cuda.max_memory_allocated`` since the last
  ``spectune._memory.reset_cuda_peak`` (a comparison grid resets it per cell), read
  when ``summary()`` is called; None without CUDA.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from spectune import _memory


class CostCallback(TrainerCallback):
    """Times optimizer steps and counts the optimizer's state; ``summary()`` gives the keys for summary.json."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.first_step_s: float | None = None
        self.state_numel: int | None = None
        self.state_mb: float | None = None
        self.active_numel: int | None = None
        self._started: float | None = None
        self._cuda = _memory.cuda_peak_mb() is not None

    def _now(self) -> float:
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.first_step_s = None  # a resumed run warms up again
        self._started = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._started = self._now()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self._started is None:
            return
        seconds = self._now() - self._started
        self._started = None
        if self.first_step_s is None:
            self.first_step_s = seconds  # warm-up: kept apart, used only when it is the only step
        else:
            self.step_seconds.append(seconds)
        if model is not None:
            active = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.active_numel = max(active, self.active_numel or 0)

    def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        if optimizer is not None:
            self.state_numel = _memory.optimizer_state_numel(optimizer)
            self.state_mb = _memory.optimizer_state_mb(optimizer)

    @property
    def seconds_per_step(self) -> float | None:
        if self.step_seconds:
            return sum(self.step_seconds) / len(self.step_seconds)
        return self.first_step_s

    def summary(self) -> dict[str, Any]:
        """``seconds_per_step``, ``optimizer_state_parameters``, ``optimizer_state_mb``, ``trainable_parameters_active``,
        ``peak_gpu_memory_mb``."""
        return {
            "seconds_per_step": self.seconds_per_step,
            "trainable_parameters_active": self.active_numel,
            "optimizer_state_parameters": self.state_numel,
            "optimizer_state_mb": self.state_mb,
            "peak_gpu_memory_mb": _memory.cuda_peak_mb(),
        }
