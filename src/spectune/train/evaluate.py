"""Causal-LM evaluation: per-token negative log-likelihood over a split, in bounded memory.

Why this module exists. The Trainer's ``evaluate`` averages each batch's token-mean
loss, so the reported loss (and ``exp(loss)``) moved with ``eval.batch_size``: rows in
short batches weighed more. Perplexity as the field defines it (lm-evaluation-harness;
the transformers perplexity guide) is ``exp(total NLL / total predicted tokens)``, which
does not depend on how rows are batched or padded. The Trainer path also held the
full-vocabulary float32 logits of a whole batch (``batch x tokens x vocab``) several
times over, so memory grew with batch size times vocabulary (262,144 entries for Gemma 3).

What is computed. For each row, the next-token targets are the labels shifted by one
(position ``t`` predicts ``labels[t + 1]``); a target of ``-100`` (padding, the prompt
of a prompt/response pair) is not predicted. The NLL of every predicted token is summed
per row and the rows' sums and counts are added over the split:
``loss = sum / count`` and ``perplexity = exp(loss)``.

How memory stays bounded. The model is run with ``logits_to_keep=1`` (its head computes
only the last position), the final hidden states are read from its decoder with a
forward hook, and only the positions that have a target are gathered and sent through
the model's own output layer, a chunk of positions at a time, so at most
``chunk x vocab`` logits exist at once. The model's own last-position logits check that
the head applied here is the model's (a model that post-processes its logits in a way
this module does not know falls back to the model's full logits, with a warning). On a
CUDA device with Liger Kernel installed its fused linear cross-entropy replaces the
chunk loop (the library, not a kernel of ours); it is not exercised on CPU.

The functions here are pure (tensors in, tensors out) except ``evaluate_lm``, the thin
loop over batches that the trainer calls.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Bytes of float32 logits one chunk may hold; cross-entropy adds a log-softmax of the same size.
DEFAULT_CHUNK_BYTES = 64 * 2**20


class EvaluationError(ValueError):
    """An evaluation that cannot give a number (no predicted token): said plainly instead of a NaN."""


@dataclass(frozen=True)
class TokenNLL:
    """Summed negative log-likelihood over a split, and what it was summed over."""

    nll_sum: float
    tokens: int  # predicted tokens (padding and masked prompt tokens excluded)
    rows: int  # rows evaluated
    rows_without_targets: int  # rows that had no predicted token (counted, contribute nothing)
    method: str  # how the cross-entropy was computed: "chunked-head", "liger", "full-logits"

    @property
    def loss(self) -> float:
        """Mean NLL per predicted token (nats)."""
        if self.tokens == 0:
            raise EvaluationError("no predicted token in this evaluation: the loss is undefined")
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(loss); an overflow (loss above ~709 nats) is reported as infinity, not capped."""
        try:
            return math.exp(self.loss)
        except OverflowError:
            return math.inf

    def metrics(self, prefix: str) -> dict[str, float | int]:
        """The figures under one split's prefix: loss, perplexity and what they were averaged over."""
        return {f"{prefix}_loss": self.loss, f"{prefix}_perplexity": self.perplexity, f"{prefix}_tokens": self.tokens,
                f"{prefix}_rows": self.rows, f"{prefix}_rows_without_targets": self.rows_without_targets}


# --- pure math ----------------------------------------------------------------------------------


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets aligned with positions: ``out[:, t] = labels[:, t + 1]``, or ``-100`` where nothing is predicted.

    Nothing is predicted from the last position, from padding (a left-padded row's
    first real token would otherwise be scored from a pad position: unpadded, that
    token is never predicted), or where the label is ``-100`` (padding, masked prompt).
    """
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        out = out.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return out


def predicted_counts(targets: torch.Tensor) -> torch.Tensor:
    """Predicted tokens per row of a batch of targets from ``next_token_targets``."""
    return (targets != IGNORE_INDEX).sum(dim=1)


def chunk_positions(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's float32 logits stay within ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(1, vocab_size)))


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2-style final logit soft-capping, ``c * tanh(z / c)``, as the model's own forward applies it."""
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def row_nll(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-row summed NLL (float64) from final hidden states, applying ``head`` to ``chunk`` positions at a time.

    ``hidden`` is ``(B, T, H)`` and ``targets`` ``(B, T)`` (already shifted, see
    ``next_token_targets``). Positions without a target are dropped before the head,
    so padding and masked prompts cost neither memory nor time.
    """
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    out = torch.zeros(targets.shape[0], dtype=torch.float64, device=hidden.device)
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        logits = softcap_logits(head(hidden[r, c]).float(), softcap)
        nll = F.cross_entropy(logits, targets[r, c], reduction="none")
        out.index_add_(0, r, nll.double())
    return out


def row_nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-row summed NLL from the model's full logits ``(B, T, V)``, upcast a chunk at a time (fallback path)."""
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    out = torch.zeros(targets.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        nll = F.cross_entropy(logits[r, c].float(), targets[r, c], reduction="none")
        out.index_add_(0, r, nll.double())
    return out


def row_nll_liger(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None) -> torch.Tensor:  # pragma: no cover - needs CUDA and liger-kernel
    """Per-row summed NLL with Liger Kernel's fused linear cross-entropy (CUDA only; logits never materialised)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none", softcap=softcap)
    nll = loss_fn(weight, hidden[rows, cols], targets[rows, cols], bias)
    out = torch.zeros(targets.shape[0], dtype=torch.float64, device=hidden.device)
    out.index_add_(0, rows, nll.double())
    return out


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Position ids counted from each row's first real token, when some row is left-padded (else None).

    Without them a left-padded row's tokens sit at shifted positions and score
    differently from the same row unpadded (``generate`` does the same).
    """
    if attention_mask.shape[1] == 0 or bool((attention_mask[:, 0] != 0).all()):
        return None
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


# --- the model side -----------------------------------------------------------------------------


@dataclass
class _Parts:
    """Where a (possibly PEFT-wrapped) causal LM keeps what the chunked path needs."""

    decoder: torch.nn.Module | None  # the base model whose first output is the final hidden state
    head: torch.nn.Module | None  # the output layer (``get_output_embeddings``)
    softcap: float | None
    keeps_logits: bool  # forward accepts ``logits_to_keep``
    prompt_learning: bool  # PEFT prompt tuning prepends virtual tokens (position ids are ignored there)


def model_parts(model: torch.nn.Module) -> _Parts:
    """Find the decoder, output layer and logit soft-cap of a causal LM, through a PEFT wrapper if any."""
    prompt_learning = bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = head = None
    try:
        decoder = inner.get_decoder()
        head = inner.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        pass
    if decoder is inner:  # no separate base model to read hidden states from
        decoder = None
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    try:
        keeps = "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        keeps = False
    return _Parts(decoder, head, softcap, keeps, prompt_learning)


@contextlib.contextmanager
def _capture_output(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first output (the last hidden state) of ``module`` while the block runs."""
    box: dict[str, torch.Tensor] = {}

    def hook(_mod: torch.nn.Module, _args: Any, output: Any) -> None:
        box["hidden"] = output[0]

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The head applied here reproduces the model's own logits (float tolerance scaled by their size)."""
    a, b = a.float(), b.float()
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= 1e-3 * (1.0 + float(b.abs().max()))


def _use_liger(device: torch.device, fused: str) -> bool:
    if fused == "torch":
        return False
    available = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if fused == "liger" and not available:
        raise EvaluationError("eval.fused_cross_entropy=liger needs a CUDA device and the liger-kernel package")
    return available


class _BatchScorer:
    """Scores one batch at a time; remembers whether the chunked path was checked and whether it holds."""

    def __init__(self, model: torch.nn.Module, chunk_bytes: int, fused: str) -> None:
        self.model = model
        self.parts = model_parts(model)
        head = self.parts.head
        weight = getattr(head, "weight", None)
        vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None
        self.vocab = vocab or int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
        self.chunk = chunk_positions(self.vocab, chunk_bytes)
        chunked = self.parts.decoder is not None and self.parts.head is not None and self.parts.keeps_logits
        self.method = "chunked-head" if chunked else "full-logits"
        self.checked = False
        self.fused = fused

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        mask = batch.get("attention_mask")
        if mask is not None and not self.parts.prompt_learning:
            positions = left_padded_positions(mask)
            if positions is not None:
                inputs["position_ids"] = positions
        inputs["use_cache"] = False
        return inputs

    def __call__(self, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        width = targets.shape[1]
        inputs = self._inputs(batch)
        if self.method != "full-logits":
            assert self.parts.decoder is not None and self.parts.head is not None
            with _capture_output(self.parts.decoder) as box:
                out = self.model(**inputs, logits_to_keep=1)
            hidden = box.get("hidden")
            if hidden is not None and hidden.shape[1] >= width:
                hidden = hidden[:, -width:]  # prompt tuning prepends virtual tokens
                if not self.checked:
                    own = out.logits[:, -1]
                    mine = softcap_logits(self.parts.head(hidden[:, -1]).float(), self.parts.softcap)
                    self.checked = True
                    if not _close(mine, own):
                        warnings.warn("evaluation: the model's logits are not its output layer applied to its last "
                                      "hidden state; falling back to full logits (memory grows with batch x vocab)")
                        self.method = "full-logits"
                if self.method != "full-logits":
                    head = self.parts.head
                    # Liger takes a plain weight: a head with an adapter (PEFT's lora.Linear) stays on the torch path
                    if isinstance(head, torch.nn.Linear) and _use_liger(hidden.device, self.fused):  # pragma: no cover
                        try:
                            nll = row_nll_liger(hidden, targets, head.weight, head.bias, self.parts.softcap)
                            self.method = "liger"
                            return nll
                        except Exception as err:  # noqa: BLE001 - an optional library: say so and use the torch path
                            warnings.warn(f"evaluation: Liger Kernel failed ({type(err).__name__}: {err}); "
                                          "using the chunked torch cross-entropy")
                            self.fused = "torch"
                    return row_nll(hidden, targets, head, self.chunk, self.parts.softcap)
            else:
                warnings.warn("evaluation: no hidden states of the expected shape from the model's decoder; "
                              "falling back to full logits")
                self.method = "full-logits"
        logits = self.model(**inputs).logits[:, -width:]
        return row_nll_from_logits(logits, targets, self.chunk)


def evaluate_lm(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    context: Callable[[], ContextManager[Any]] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    fused: str = "auto",
) -> TokenNLL:
    """Per-token NLL of a causal LM over ``batches`` (dicts with input_ids, attention_mask, labels on the model's device).

    ``gather`` combines per-row tensors across processes (the Trainer's
    ``accelerator.gather_for_metrics``, which also drops the rows repeated to even out
    the last batch); ``context`` wraps each forward (the Trainer's autocast).
    Raises ``EvaluationError`` when no row has a predicted token.
    """
    scorer = _BatchScorer(model, chunk_bytes, fused)
    gather = gather or (lambda t: t)
    context = context or contextlib.nullcontext
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = rows = empty = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                targets = next_token_targets(batch["labels"], batch.get("attention_mask"))
                with context():
                    nll = scorer(batch, targets)
                counts = predicted_counts(targets)
                nll, counts = gather(nll), gather(counts)
                total += nll.sum().cpu()
                tokens += int(counts.sum())
                rows += int(counts.numel())
                empty += int((counts == 0).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise EvaluationError(f"no predicted token in {rows} evaluated rows (every target is padding or a masked "
                              "prompt): the loss is undefined")
    return TokenNLL(float(total), tokens, rows, empty, scorer.method)

