"""``spectune train``: one configured fine-tuning run on the Hugging Face stack, with a plan applied.

The run folder holds everything needed to read or resume it: the resolved
config, every plan used, checkpoints, metrics.jsonl, the spectral trajectory,
summary.json (wall time, peak memory, trainable parameters) and the final model
or adapter in safetensors.
"""

from __future__ import annotations

import math
import os
import random
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import speed_metrics

from spectune import _io
from spectune.analyze import analyze
from spectune.analyze.builtin import ALIASES, model_path
from spectune.plan import Plan, match_names, param_groups, plan as make_plan
from spectune._config import first_difference
from spectune.train import callbacks as cb
from spectune.train.checkpoints import CheckpointError, MarkComplete, checkpoints, last_checkpoint
from spectune.train.config import TrainConfig, stored_config_yaml
from spectune.train.data import DataError, TextSplits, load_data
from spectune.train.evaluate import IGNORE_INDEX, evaluate_lm
from spectune.train.methods import SwitchAdapters, apply_method, count_trainable, inject_switch_adapters


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    plans: list[str] = field(default_factory=list)


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
                 lm_eval: bool = False, chunk_bytes: int = 64 * 2**20, fused: str = "auto", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.group_fn = group_fn
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
        if self.optimizer is None and self.group_fn is not None:
            opt_model = self.model if model is None else model
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs.pop("lr", None)
            self.optimizer = cls(self.group_fn(opt_model), lr=self.args.learning_rate, **kwargs)
            self.initial_scale = cb.weighted_scale(self.optimizer.param_groups)
            return self.optimizer
        return super().create_optimizer(model)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
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


# --- model and tokenizer ------------------------------------------------------------------------


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device() -> str:
    """Where this process trains: its CUDA device under a launcher, else the CPU (as the Trainer decides)."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _supports(dtype: torch.dtype, device: str) -> bool:
    """Whether the hardware trains in ``dtype``: float16 needs CUDA (CPU kernels and the Trainer's loss scaler
    do not cover it), bfloat16 runs on every CPU torch supports and on CUDA devices that report it."""
    if dtype == torch.float32:
        return True
    if device == "cpu":
        return dtype == torch.bfloat16
    return dtype == torch.float16 or torch.cuda.is_bf16_supported()


def resolve_dtype(cfg: TrainConfig, path: str, device: str | None = None) -> torch.dtype:
    """The dtype the weights are loaded in, from ``model.dtype``; refuses what this hardware cannot train.

    ``auto`` takes the checkpoint's own dtype (its config's ``dtype`` / ``torch_dtype``)
    where the hardware runs it, else float32 with a warning naming both (a float16
    checkpoint on CPU). An explicit request the hardware cannot run is an error naming
    ``model.dtype``: training would otherwise fail later in a kernel with a message that
    says nothing about the config.
    """
    import warnings

    from transformers import AutoConfig

    device = device or _device()
    want = cfg.model.dtype
    if want == "auto":
        conf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        stored = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
        if dtype not in _DTYPES.values():
            return torch.float32
        if not _supports(dtype, device):
            warnings.warn(f"model.dtype auto: the checkpoint is {str(dtype).removeprefix('torch.')}, which {device} "
                          "cannot train; loading it in float32 instead", stacklevel=2)
            return torch.float32
        return dtype
    dtype = _DTYPES[want]
    if not _supports(dtype, device):
        raise ValueError(f"model.dtype={want}: {device} cannot train in {want} (float16 needs a CUDA GPU, bfloat16 a "
                         "GPU that supports it); use bfloat16 or float32 on CPU, or auto")
    return dtype


def quantization_config(cfg: TrainConfig, task: str, device: str) -> Any:
    """bitsandbytes 4-bit settings for ``method.kind: qlora``; an error naming the reason where 4-bit cannot run.

    bitsandbytes runs 4-bit on CPU since its multi-backend releases (0.50.2 was checked:
    NF4 with double quantisation, forward and LoRA backward). Whether the installed
    build does is tested here on one small tensor, so an old or broken install is
    reported before a model is loaded, not as a failure inside the first matmul.
    """
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError("method.kind=qlora needs bitsandbytes, which is not installed: pip install "
                         "'spectune[qlora]' (or pip install bitsandbytes)") from err
    if cfg.method.compute_dtype == "float16" and device == "cpu":
        raise ValueError("method.compute_dtype=float16: the CPU cannot compute in float16; use bfloat16 or float32")
    try:
        probe = torch.randn(64, 64, device=device)
        packed, state = bnb.functional.quantize_4bit(probe, quant_type=cfg.method.quant_type,
                                                     compress_statistics=cfg.method.double_quant)
        bnb.functional.dequantize_4bit(packed, state)
    except Exception as err:  # noqa: BLE001 - any failure means this build cannot quantize here; say why
        raise ValueError(f"method.kind=qlora: bitsandbytes {bnb.__version__} cannot run 4-bit on {device}: "
                         f"{type(err).__name__}: {err}") from err
    from spectune.train.methods import HEAD_NAMES

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.method.quant_type, bnb_4bit_use_double_quant=cfg.method.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[cfg.method.compute_dtype],
        # a new classification head starts random and trains in full: it must stay a float matrix
        llm_int8_skip_modules=list(HEAD_NAMES) + ["lm_head"] if task == "classification" else None,
    )


def load_model(cfg: TrainConfig, task: str, num_labels: int | None) -> tuple[torch.nn.Module, Any]:
    """The task model in ``model.dtype`` (4-bit base weights under qlora) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = model_path(cfg.model.name)
    if not Path(path).exists():
        raise FileNotFoundError(f"model not found: {cfg.model.name} (neither an alias {sorted(ALIASES)} nor a folder)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if cfg.data.format == "chat":
        from spectune.train.chat import ensure_template

        ensure_template(tok, cfg.model.chat_template, cfg.model.name)
    elif cfg.model.chat_template is not None:
        tok.chat_template = cfg.model.chat_template  # saved with final/ for generation, though plain data ignores it
    device = _device()
    kw: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code, "dtype": resolve_dtype(cfg, path, device)}
    if cfg.method.kind == "qlora":
        kw["quantization_config"] = quantization_config(cfg, task, device)
        kw["device_map"] = {"": device}  # bitsandbytes quantizes while loading, on the device it will run on
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model, tok


# --- data ---------------------------------------------------------------------------------------


def lm_blocks(ids: list[int], max_length: int, bos: int | None, min_tokens: int = 8) -> list[list[int]]:
    """A row's token ids cut into blocks of at most ``max_length`` (shorter than ``min_tokens`` dropped).

    Where the tokenizer starts a text with BOS (Gemma), every block starts with it, as the
    model saw text in pre-training: a Gemma block without ``<bos>`` scores perplexity
    1,548 against 124 with it (docs/benchmarks.md). Tokenizers that add none (SmolLM2)
    get plain consecutive slices.
    """
    if bos is not None and ids and ids[0] == bos and max_length > 1:
        body, width = ids[1:], max_length - 1
        blocks = [[bos] + body[i : i + width] for i in range(0, len(body), width)]
    else:
        blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [b for b in blocks if len(b) >= min_tokens]


def tokenize(splits: TextSplits, tok: Any, max_length: int, fmt: str = "plain") -> dict[str, Any]:
    """Token ids per split; causal LM responses are the only supervised tokens when present.

    ``fmt="chat"`` renders each row (a conversation, or an instruction/response pair as
    one user and one assistant turn) with the tokenizer's chat template, and supervises
    the assistant's tokens alone (``spectune.train.chat``).
    """
    def cls_fn(batch: dict[str, list]) -> dict[str, Any]:
        out = tok(batch["text"], truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out

    def chat_fn(batch: dict[str, list]) -> dict[str, Any]:
        from spectune.train.chat import conversation, tokenize_chat

        responses = batch.get("response") or [None] * len(batch["text"])
        ids, labels = [], []
        for text, resp in zip(batch["text"], responses):
            i, lab = tokenize_chat(tok, conversation(text, resp), max_length)
            ids.append(i)
            labels.append(lab)
        return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids], "labels": labels}

    def lm_fn(batch: dict[str, list]) -> dict[str, Any]:
        if "response" in batch and batch["response"] is not None:
            ids, labels = [], []
            for prompt, resp in zip(batch["text"], batch["response"]):
                p = tok(prompt, add_special_tokens=True)["input_ids"]
                r = tok(str(resp) + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
                seq = (p + r)[:max_length]
                ids.append(seq)
                labels.append(([-100] * len(p) + r)[:max_length])
            return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids], "labels": labels}
        # plain text: every row is cut into max_length-token blocks, so long passages
        # (a 2,000-character Shakespeare chunk) are learned whole instead of truncated
        blocks: list[list[int]] = []
        for ids in tok(batch["text"], add_special_tokens=True)["input_ids"]:
            blocks += lm_blocks(ids, max_length, tok.bos_token_id)
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": [list(b) for b in blocks]}

    fn = cls_fn if splits.task == "classification" else chat_fn if fmt == "chat" else lm_fn
    out = {}
    for name in ("train", "validation", "test"):
        ds = getattr(splits, name)
        out[name] = ds.map(fn, batched=True, remove_columns=ds.column_names)
    return out


def collator(task: str, tok: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "classification":
        return DataCollatorWithPadding(tok)
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)


def drop_untargeted(data: dict[str, Any], needed: list[str]) -> dict[str, int]:
    """Drop causal-LM rows with no predicted token, in place; return how many each split lost.

    A prompt that fills ``max_length`` leaves its response truncated away; such a row
    has nothing to score. Kept, it would add nothing to an evaluation and could make a
    training batch's loss 0/0 (NaN). It is dropped and counted instead, and a split of
    ``needed`` left with no row at all stops the run before training, naming the split.
    """
    skipped: dict[str, int] = {}
    for split, ds in data.items():
        keep = [any(y != IGNORE_INDEX for y in lab[1:]) for lab in ds["labels"]]  # the first token is never predicted
        skipped[split] = len(keep) - sum(keep)
        if skipped[split]:
            data[split] = ds.select([i for i, k in enumerate(keep) if k])
        if split in needed and len(data[split]) == 0:
            raise DataError(
                f"split {split!r}: none of its {len(keep)} rows has a token left to predict after truncation to "
                "model.max_length (prompts fill it, so every response is cut away); raise model.max_length or "
                "shorten the prompts")
    return skipped


def compute_metrics_fn(task: str) -> Any:
    if task != "classification":
        return None

    def fn(pred: Any) -> dict[str, float]:
        from sklearn.metrics import f1_score

        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        y = np.argmax(logits, axis=-1)
        return {"accuracy": float((y == pred.label_ids).mean()), "macro_f1": float(f1_score(pred.label_ids, y, average="macro"))}

    return fn


# --- the run ------------------------------------------------------------------------------------


def _world() -> tuple[int, bool]:
    """(world size, whether this process is rank 0) from the launcher's environment (torchrun, accelerate launch).

    Read before the Trainer exists (it sets up the process group), so files written
    before training are written by rank 0 alone.
    """
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0


class ConfigChanged(ValueError):
    """``--resume`` with a config that differs from the one the run started with."""


def required_state(cfg: TrainConfig) -> list[str]:
    """spectune's own files a checkpoint of this run must hold to resume it as the run it was."""
    need = []
    if cfg.plan.policy and cfg.plan.replan != "never":
        need += [cb.STATE_FILE, "spectune_plan.yaml"]
    if cfg.plan.switch_to_light:
        need.append(cb.SWITCH_FILE)
    return need


def _check_resumed_config(cfg: TrainConfig, run_dir: Path, ckpt: Path, allow_change: bool) -> list[str]:
    """Refuse a resume under another config (naming the first differing key) unless allowed; then record it."""
    stored = run_dir / "config.yaml"
    was = stored_config_yaml(stored.read_text()) if stored.exists() else None
    if was is None or was == cfg.to_yaml():
        return []
    change = first_difference(was, cfg.to_yaml())
    if not allow_change:
        raise ConfigChanged(
            f"--resume: the config differs from the one {run_dir} was started with ({change}); resume with the "
            "original config, or pass --allow-config-change to continue under this one (it is then recorded)")
    _io.write_text(run_dir / f"config-before-resume-{ckpt.name}.yaml", stored.read_text())
    return [f"resumed from {ckpt.name} with a changed config: {change}"]


def run(cfg: TrainConfig, resume: bool = False, extra_callbacks: list[Any] | None = None,
        allow_config_change: bool = False) -> RunResult:
    """Train as configured; with ``resume`` continue from the run folder's last usable checkpoint.

    ``extra_callbacks`` are added to the Trainer (progress hooks, or a test's simulated crash).
    A resume under a config other than the stored one is refused unless ``allow_config_change``
    (the change is then recorded in summary.json and the old config kept beside the new).
    """
    t0 = time.perf_counter()
    world, main = _world()
    from spectune.train import distributed

    distributed.check_fsdp_launch(cfg.train.distributed)  # before a model is loaded: FSDP that would not shard
    run_dir = Path(cfg.output.dir)
    ckpt, config_changes = _check_run_dir(cfg, run_dir, resume, allow_config_change)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        _io.write_text(run_dir / "config.yaml", cfg.to_yaml())
    set_seed(cfg.train.seed)

    preference = cfg.method.objective != "sft"  # dpo, orpo, cpo, simpo: pairs through TRL (spectune.train.preference)
    if preference:
        from spectune.train import preference as pref
    splits = pref.preference_splits(cfg) if preference else load_data(cfg.data)
    task = splits.task if cfg.model.task == "auto" else cfg.model.task
    if task != splits.task:
        raise ValueError(f"model.task={task} but the data is for {splits.task}")
    model, tok = load_model(cfg, task, len(splits.label_names or []) or None)
    skipped: dict[str, int] = {}
    if preference:
        data, skipped = pref.preference_inputs(splits, tok, cfg)
    else:
        data = tokenize(splits, tok, cfg.model.max_length, cfg.data.format)
    if task == "causal_lm" and not preference:
        # validation is evaluated during training, and sizes the training subset evaluated at the end
        uses_validation = cfg.eval.every != "no" or "train" in cfg.eval.final_splits
        skipped = drop_untargeted(data, ["train", *cfg.eval.final_splits] + (["validation"] if uses_validation else []))

    steps_per_epoch = math.ceil(len(data["train"]) / (cfg.train.batch_size * cfg.train.grad_accum * world))
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(steps_per_epoch * cfg.train.epochs)

    plan, planned_epoch = _initial_plan(cfg, model, ckpt)
    if plan is not None:
        match_names(list(plan.lr_scale), [n for n, _ in model.named_parameters()])  # fail before training
        if main and not resume:
            plan.save(run_dir / "plans" / "plan-epoch0-step0.yaml")

    light: dict[str, str] = {}
    switchable: SwitchAdapters | None = None
    if cfg.plan.switch_to_light:
        if plan is None or plan.lora is None:  # method.kind=full and a plan are checked with the config
            raise ValueError(
                "plan.switch_to_light needs a plan with lightweight matrices (policy stable-rank with low: lora)"
            )
        if world > 1:
            raise ValueError(
                "plan.switch_to_light runs in one process: DDP registers the trainable parameters when it wraps "
                "the model, so matrices cannot switch to adapters mid-run under several processes"
            )
        wanted = [t + ".weight" for t in plan.lora.target_modules]
        light = match_names(wanted, [n for n, _ in model.named_parameters()])
        # everything trains in full until the switch; the plan's rates still apply
        plan_for_method: Plan | None = plan.model_copy(update={"trainable": None, "lora": None})
    else:
        plan_for_method = plan
    model = apply_method(model, cfg.method, task, plan_for_method, total_steps)
    if light:
        assert plan is not None
        # dormant adapters (B = 0, frozen) exist before the optimizer, which holds them from the start
        switchable = inject_switch_adapters(model, plan, light, cfg.method.lora_dropout)
    trainable, total = count_trainable(model)
    if trainable == 0:
        raise ValueError("nothing to train: the method and plan leave no parameter with requires_grad")

    cache: dict[str, Any] = {"options": {"alpha_estimator": cfg.plan.alpha_estimator}}
    metrics_log = cb.MetricsLog(run_dir / "metrics.jsonl")
    guard = cb.StopOnNonFinite()
    callbacks: list[Any] = [metrics_log, guard]
    replanner = None
    if plan is not None and cfg.plan.policy and cfg.plan.replan != "never" and plan.policy == cfg.plan.policy:
        replanner = cb.ReplanCallback(cfg.plan, plan, cfg.train.lr, cfg.train.weight_decay, run_dir, cache, planned_epoch,
                                      always=switchable.parameter_names() if switchable else None,
                                      adapters=switchable.adapter_names() if switchable else None,
                                      adapter_ratio=cfg.plan.switch_lr_ratio)
        callbacks.append(replanner)
    if cfg.logging.track_metrics:  # an empty list switches tracking off (a comparison grid needs no trajectories)
        callbacks.append(cb.SpectralTracker(run_dir, cfg.logging.track_metrics, cfg.logging.track_spectra_every_steps, cache))
    if cfg.method.kind == "adalora":
        callbacks.append(cb.AdaLoraBudget())
    switcher = None
    if switchable is not None:
        assert plan is not None and plan.lora is not None
        ranks = {t + ".weight": plan.lora.rank_pattern.get(t, plan.lora.r) for t in plan.lora.target_modules}
        switcher = cb.StableRankSwitch(switchable.modules, cfg.plan.switch_tol, cfg.plan.switch_patience,
                                       cfg.plan.switch_every_steps, run_dir, cache, cb.restore_switches(ckpt), ranks)
        callbacks.append(switcher)
    if cfg.train.distributed == "fsdp" and plan is not None:
        callbacks.append(distributed.ShardedGroupsCheck())  # each plan group holds its own sharded parameter
    callbacks += list(extra_callbacks or [])
    callbacks.append(MarkComplete())  # last: its marker says every other callback's files are written

    def group_fn(m: torch.nn.Module) -> list[dict[str, Any]]:
        current = replanner.plan if replanner is not None else plan
        assert current is not None
        if switchable is None:
            return param_groups(m, current, cfg.train.lr, cfg.train.weight_decay)
        with cb.grads_for(m, switchable.parameter_names()):
            groups = param_groups(m, current, cfg.train.lr, cfg.train.weight_decay)
        return cb.scale_groups(groups, switchable.adapter_names(), cfg.plan.switch_lr_ratio)

    if cfg.logging.tensorboard:
        # the Trainer's TensorBoard callback reads its folder from the environment; keep it in the run folder
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard" / "trainer")
    args = training_arguments(cfg, run_dir / "checkpoints", total_steps, world)
    if preference:
        # TRL's trainer for the objective, sharing SpectralTrainer's optimizer groups, guard and callbacks
        trainer: SpectralTrainer = pref.build_trainer(cfg, model, tok, args, data, callbacks,
                                                      group_fn if plan is not None else None, guard)
    else:
        trainer = SpectralTrainer(
            model=model,
            args=args,
            train_dataset=data["train"],
            eval_dataset=data["validation"],
            data_collator=collator(task, tok),
            compute_metrics=compute_metrics_fn(task),
            callbacks=callbacks,
            group_fn=group_fn if plan is not None else None,
            guard=guard,
            lm_eval=task == "causal_lm",
            chunk_bytes=cfg.eval.chunk_mb * 2**20,
            fused=cfg.eval.fused_cross_entropy,
        )
    if task == "classification":
        # the classification loss is a per-batch mean that ignores num_items_in_batch: without this the
        # Trainer multiplies it by the number of processes (and skips the division by grad_accum)
        trainer.model_accepts_loss_kwargs = False
    if not cfg.logging.progress:
        # without a bar the Trainer prints every log dict instead; metrics.jsonl already holds them
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    main = trainer.is_world_process_zero()
    train_out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if guard.bad_step is not None:
        try:
            good = last_checkpoint(run_dir, required_state(cfg))
        except CheckpointError:
            good = None
        raise TrainingDiverged(
            f"loss became NaN/Inf at step {guard.bad_step}; training stopped. "
            f"Last good checkpoint: {good if good else 'none (no checkpoint was saved before the divergence)'}"
        )

    results, evaluation = _final_metrics(trainer, data, cfg.eval.final_splits)
    results = {"training_loss": train_out.training_loss, **results, **generalization_gaps(results)}
    if main:
        metrics_log.write({"step": trainer.state.global_step, "kind": "final", **results})
    trainable_end, _ = count_trainable(model)
    if switchable is not None and cfg.output.save_final:
        # final/ is a plain model: every adapter merged into its base weight (W + BA), names as before
        switchable.tuner.merge_and_unload()
    if cfg.output.save_final:
        trainer.save_model(str(run_dir / "final"))  # rank 0 writes; every rank must call it (FSDP/DeepSpeed gather)
        if main:
            tok.save_pretrained(str(run_dir / "final"))
    summary = {
        "metrics": results,
        "task": task,
        "method": cfg.method.kind,
        "objective": cfg.method.objective,
        "policy": cfg.plan.policy,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_parameters_end": trainable_end,
        "switched_matrices": list(switcher.switched) if switcher else None,
        "wall_time_s": time.perf_counter() - t0,
        "train_runtime_s": train_out.metrics.get("train_runtime"),
        "train_samples_per_second": train_out.metrics.get("train_samples_per_second"),
        "train_steps_per_second": train_out.metrics.get("train_steps_per_second"),
        "evaluation": evaluation,
        "skipped_rows": skipped,
        "analysis_time_s": cache.get("seconds", 0.0),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "global_step": trainer.state.global_step,
        # mean over the plans the run used: the first optimizer groups, then each re-plan
        "mean_lr_scale": float(np.mean([trainer.initial_scale] + [h["mean_lr_scale"] for h in replanner.history]))
        if replanner else trainer.initial_scale,
        "plans": [h["plan"] for h in replanner.history] if replanner else [],
        "data": splits.description + (
            f"; dropped rows with no token left to predict after truncation: {skipped}" if any(skipped.values()) else ""),
        "config_changes": config_changes + _earlier_changes(run_dir),
    }
    if main:
        _io.write_json(run_dir / "summary.json", summary)
    return RunResult(run_dir=run_dir, metrics=results, plans=summary["plans"])


def _check_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool, allow_change: bool) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None for a fresh run) and the recorded config changes; refuses what would mix runs.

    Every rank checks the folder before any rank writes to it. No rank can write a
    checkpoint before all ranks have joined the first training step, so the ranks
    see the same checkpoints here and agree on refusing (or resuming).
    """
    ckpt = last_checkpoint(run_dir, required_state(cfg)) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if not resume and checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another output.dir")
    return ckpt, (_check_resumed_config(cfg, run_dir, ckpt, allow_change) if ckpt is not None else [])


def _initial_plan(cfg: TrainConfig, model: torch.nn.Module, ckpt: Path | None) -> tuple[Plan | None, int]:
    """The plan and planned epoch a run starts with: restored from the checkpoint on resume, else a fixed
    file, else the policy on the base weights. Every rank computes it from the same files and seed, so
    every rank holds the same plan."""
    if ckpt is not None:
        plan, planned_epoch = cb.restore_plan_state(ckpt)
        if plan is not None:
            return plan, planned_epoch
    if cfg.plan.file:
        return Plan.load(cfg.plan.file), 0
    if not cfg.plan.policy:
        return None, 0
    params = dict(cfg.plan.params)
    if cfg.plan.policy == "phased":
        params["epoch"] = 0
    # qlora: the first plan reads the checkpoint's own weights, one tensor at a time from the folder, rather than
    # their 4-bit copies (re-plans read the training model's, dequantized, with the adapters merged)
    source: Any = model_path(cfg.model.name) if cfg.method.kind == "qlora" else model
    result = analyze(source, progress=False, alpha_estimator=cfg.plan.alpha_estimator)
    return make_plan(result, cfg.plan.policy, params, one_d_rule=cfg.plan.one_d_rule), 0


def _final_metrics(trainer: Trainer, data: dict[str, Any], splits: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each split's quality figures (``<split>_loss``, ...) and, apart, its evaluation time and bookkeeping.

    One name per figure: the final evaluations log under ``final_<split>`` (in metrics.jsonl
    the training subset's evaluation would otherwise log a second ``train_runtime``); the
    training subset is as large as the validation split.
    """
    results: dict[str, Any] = {}
    evaluation: dict[str, dict[str, Any]] = {}
    for split in splits:
        ds = data[split] if split != "train" else data["train"].select(range(min(len(data["train"]), len(data["validation"]))))
        prefix = f"final_{split}"
        m = {split + k[len(prefix):]: v for k, v in trainer.evaluate(ds, metric_key_prefix=prefix).items()
             if k.startswith(prefix + "_")}
        evaluation[split] = _evaluation_record(m, split, len(ds))
        results.update({k: v for k, v in m.items() if k.startswith(f"{split}_") and _is_metric(k, split)})
    return results, evaluation


def generalization_gaps(results: dict[str, Any]) -> dict[str, float]:
    """Train minus test for accuracy and macro-F1 (higher is better), test minus train for loss."""
    gaps = {f"gap_{k}": results[f"train_{k}"] - results[f"test_{k}"]
            for k in ("accuracy", "macro_f1") if f"train_{k}" in results and f"test_{k}" in results}
    if "train_loss" in results and "test_loss" in results:
        gaps["gap_loss"] = results["test_loss"] - results["train_loss"]
    return gaps


def _earlier_changes(run_dir: Path) -> list[str]:
    """Config changes recorded by earlier resumes of this run (kept across further resumes)."""
    import json

    path = run_dir / "summary.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("config_changes") or [])


_EVAL_FIELDS = ("rows", "rows_without_targets", "method")


def _is_metric(key: str, split: str) -> bool:
    """A quality figure of a split (loss, accuracy, perplexity, tokens): not its timing or bookkeeping."""
    rest = key[len(split) + 1:]
    return not key.endswith(SPEED_SUFFIXES) and rest not in _EVAL_FIELDS


def _evaluation_record(m: dict[str, Any], split: str, rows: int) -> dict[str, Any]:
    """One split's evaluation time, throughput and bookkeeping, under names that cannot collide with training's."""
    out: dict[str, Any] = {"rows": rows}
    for suffix, name in (("_runtime", "runtime_s"), ("_samples_per_second", "samples_per_second"),
                         ("_steps_per_second", "steps_per_second"), ("_tokens_per_second", "tokens_per_second")):
        if f"{split}{suffix}" in m:
            out[name] = m[f"{split}{suffix}"]
    for f in _EVAL_FIELDS:
        if f"{split}_{f}" in m:
            out[f] = m[f"{split}_{f}"]
    return out


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

