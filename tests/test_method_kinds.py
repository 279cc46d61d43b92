"""Every method kind in the registry through the same invariants, on tiny in-memory models (a peft-style table).

Per kind: only its own parameters train; a rate plan's per-matrix rates reach every
trained parameter (an adapter takes its layer's) in the SpectralTrainer's optimizer; a
few steps on one batch keep the loss finite and bring it down; a rank plan sets the
module sizes of the kinds that take one and is refused, naming the field, by the rest;
a kind marked mergeable folds into a plain model computing the same logits.
SVFT is checked against its explicit construction from ``torch.linalg.svd``. A
slow test resumes a killed run of a few kinds to identical metrics.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from spectune.analyze import analyze
from spectune.analyze.sources import canonical_name
from spectune.plan import Plan, param_groups, plan as make_plan
from spectune.train import TrainConfigError, load_config
from spectune.train.methods import METHODS, RANKS, RATES, build_context
from spectune.train.methods import svft
from spectune.train.methods.fourierft import scaled_frequencies
from spectune.train.methods.table import doc_table, kinds_table
from spectune.train.trainer import SpectralTrainer
from tests.conftest import tiny_config, tiny_model

# what each kind trains on the tiny Qwen2 (it has q/k/v biases, for BitFit): a regex every trainable name matches and
# every parameter matching it trains (the kind's whole adapter), or BASE: only parameters the base model already has
BASE = "base"
TRAINS: dict[str, str] = {
    "full": BASE, "frozen": "(?!)", "bitfit": r"\.bias$", "lisa": BASE, "galore": BASE, "mezo": BASE,
    "lora": r"\.lora_[AB]\.", "rslora": r"\.lora_[AB]\.", "dora": r"\.lora_(A|B|magnitude_vector)\.",
    "qlora": r"\.lora_[AB]\.", "adalora": r"\.lora_[ABE]\.", "ia3": r"\.ia3_l\.",
    "prompt_tuning": r"^prompt_encoder\.", "prefix_tuning": r"^prompt_encoder\.", "p_tuning": r"^prompt_encoder\.",
    "loha": r"\.hada_w[12]_[ab]\.", "lokr": r"\.lokr_w[12](_[ab])?\.", "fourierft": r"\.fourierft_spectrum\.",
    "hra": r"\.hra_u\.", "oft": r"\.oft_R\.", "boft": r"\.boft_[Rs]\.", "vera": r"\.vera_lambda_[bd]\.",
    "randlora": r"\.randlora_(lambda|gamma)\.", "miss": r"\.miss_block\.", "svft": r"\.svft_m$",
}
# settings that fit a hidden-32 model (PEFT's defaults assume hundreds of features), and rates that memorise a batch
SETTINGS: dict[str, dict[str, Any]] = {
    "fourierft": {"n_frequency": 64, "scaling": 10.0}, "miss": {"r": 8}, "vera": {"r": 16}, "randlora": {"r": 8},
    "oft": {"oft_block_size": 8}, "adalora": {"r": 4, "adalora_target_r": 2}, "galore": {"rank": 4},
    "prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4}, "svft": {"pattern": "banded", "off_diag": 1}, "lisa": {"layers": 1},
}
LR: dict[str, float] = {"mezo": 1e-2, "full": 3e-3, "lisa": 3e-3, "galore": 3e-3, "bitfit": 3e-2, "ia3": 2e-1,
                        "vera": 3e-2, "boft": 3e-2, "fourierft": 5e-2, "prompt_tuning": 3e-1, "prefix_tuning": 1e-1,
                        "p_tuning": 1e-2}
STEPS = 8
# how far the loss must fall in STEPS steps (0.05 elsewhere): SPSA moves along one random direction a step
FALL = {"mezo": 0.01}
needs_bnb = importlib.util.find_spec("bitsandbytes") is None


def kinds() -> list[Any]:
    """Every registered kind; qlora where bitsandbytes is installed (its base loads in 4 bits from a folder)."""
    return [pytest.param(k, marks=pytest.mark.skipif(needs_bnb, reason="bitsandbytes not installed"))
            if k == "qlora" else k for k in METHODS]


def base_model(kind: str, folder: Path) -> torch.nn.Module:
    """The tiny Qwen2 causal LM (hidden 64 and loaded in 4 bits for qlora: bitsandbytes' CPU blocks are 64 wide)."""
    spec = METHODS[kind]
    if spec.load_kwargs is None:
        return tiny_model("qwen2").train()
    import transformers as tf

    torch.manual_seed(0)
    config = tiny_config("qwen2")
    config.hidden_size, config.intermediate_size = 64, 128
    tf.Qwen2ForCausalLM(config).save_pretrained(folder)
    kw = spec.load_kwargs(spec.config(kind=kind, compute_dtype="float32"), "causal_lm", "cpu")
    return tf.AutoModelForCausalLM.from_pretrained(folder, **kw)


def method_config(kind: str, **over: Any) -> Any:
    return METHODS[kind].config(kind=kind, **{**SETTINGS.get(kind, {}), **over})


def build(kind: str, folder: Path, plan: Plan | None = None, **over: Any) -> tuple[torch.nn.Module, Any, Any]:
    """The kind on the tiny model as a run builds it: (model, its config, its build context)."""
    model, cfg = base_model(kind, folder), method_config(kind, **over)
    ctx = build_context(model, cfg, "causal_lm", plan, STEPS, seed=0)
    return METHODS[kind].build(model, cfg, ctx), cfg, ctx


@pytest.fixture(scope="module")
def rate_plan() -> Plan:
    """A rate plan for the tiny Qwen2 with a different rate for every matrix (so a wrong mapping shows)."""
    plan = make_plan(analyze(tiny_model("qwen2"), progress=False), "alpha-balance")
    names = sorted(plan.lr_scale)
    scales = {n: 0.3 + 0.7 * i / len(names) for i, n in enumerate(names)}
    return plan.model_copy(update={"lr_scale": scales, "min_scale": 0.0, "max_scale": 1.0})


@pytest.fixture(scope="module")
def rank_plan() -> Plan:
    """An adaptive-rank plan for the tiny Qwen2 with ranks 1 to 3 (LoKr keeps a factor dense from r = side / 2)."""
    plan = make_plan(analyze(tiny_model("qwen2"), progress=False), "adaptive-rank", {"min_rank": 1, "max_rank": 3})
    assert plan.lora is not None and len(set(plan.lora.rank_pattern.values())) > 1
    return plan


def layer_scale(name: str, scales: dict[str, float]) -> float:
    """The rate a parameter should get: its own matrix's, else that of the layer whose module path holds it
    (adapters, biases), else 1 (norms, prompt encoders)."""
    c = canonical_name(name)
    if c in scales:
        return scales[c]
    owners = [k.removesuffix(".weight") for k in scales if c.startswith(k.removesuffix(".weight") + ".")]
    return scales[max(owners, key=len) + ".weight"] if owners else 1.0


@pytest.mark.parametrize("kind", kinds())
def test_only_the_kinds_own_parameters_train(kind: str, tmp_path: Path) -> None:
    base_names = {n for n, _ in tiny_model("qwen2").named_parameters()}
    model, _, _ = build(kind, tmp_path / "m")
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    rule = TRAINS[kind]
    if rule == BASE:
        assert trained and {canonical_name(n) for n in trained} <= base_names
        if kind == "full":
            assert trained == set(params)
        return
    assert all(re.search(rule, n) for n in trained), sorted(n for n in trained if not re.search(rule, n))[:3]
    assert {n for n in params if re.search(rule, n)} == trained


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def one_batch(vocab: int = 128) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def train_one_batch(model: torch.nn.Module, kind: str, cfg: Any, ctx: Any, plan: Plan | None,
                    out: Path) -> tuple[SpectralTrainer, list[float]]:
    """``STEPS`` optimizer steps of the SpectralTrainer (the kind's optimizer, step and callbacks) on one batch."""
    spec, lr, log = METHODS[kind], LR.get(kind, 1e-2), Losses()
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=lr,
                             lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
    hooks = spec.callbacks(cfg, ctx) if spec.callbacks else []
    trainer = SpectralTrainer(model=model, args=args, train_dataset=one_batch(), callbacks=[log, *hooks],
                              group_fn=(lambda m: param_groups(m, plan, lr)) if plan is not None else None,
                              method=spec, method_config=cfg)
    gc.freeze()  # accelerate runs gc.collect() when train() ends: over a test session's heap that is most of its time
    try:
        trainer.train()
    finally:
        gc.unfreeze()
    return trainer, log.losses


@pytest.mark.parametrize("kind", [k for k in kinds() if k != "frozen"])
def test_a_few_steps_on_one_batch_lower_the_loss_with_the_plans_rates(kind: str, rate_plan: Plan,
                                                                       tmp_path: Path) -> None:
    plan = rate_plan if RATES in METHODS[kind].plan_sets else None
    model, cfg, ctx = build(kind, tmp_path / "m", plan)
    trainer, losses = train_one_batch(model, kind, cfg, ctx, plan, tmp_path / "out")
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - FALL.get(kind, 0.05), losses
    if plan is None:
        return
    groups = [g for g in trainer.optimizer.param_groups if "name" in g]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {g["name"] for g in groups} >= trained
    for g in groups:
        assert g["lr_scale"] == pytest.approx(layer_scale(g["name"], rate_plan.lr_scale)), g["name"]
    adapters = [g for g in groups if canonical_name(g["name"]) not in rate_plan.lr_scale and g["lr_scale"] != 1.0]
    assert adapters or TRAINS[kind] == BASE or kind == "bitfit"  # adapters took their layers' (non-unit) rates


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its adapters folded into the base weights: PEFT's merge, SVFT's own, or the model itself."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return svft.merge(model)


@pytest.mark.parametrize("kind", [k for k, m in METHODS.items() if m.mergeable and k not in ("qlora", "frozen")])
def test_a_mergeable_kind_merges_into_a_plain_model_computing_the_same(kind: str, tmp_path: Path) -> None:
    """``mergeable`` is true: trained (here: perturbed) adapters fold into the base's own weights, same logits."""
    base = tiny_model("qwen2")
    model, _, _ = build(kind, tmp_path / "m")
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 128, (2, 9))
    before = model(input_ids=x).logits
    assert not torch.allclose(before, base(input_ids=x).logits, atol=1e-3)  # the adapters changed the function
    plain = merged(model)
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert torch.allclose(plain(input_ids=x).logits, before, atol=1e-5)


@pytest.mark.parametrize("kind", [k for k, m in METHODS.items() if m.mergeable and TRAINS[k] != BASE
                                  and k not in ("qlora", "frozen", "bitfit")])
def test_a_replan_reads_each_adapted_matrix_as_the_layer_applies_it(kind: str, tmp_path: Path) -> None:
    """Re-plans analyse the training model: its matrices are the merged ones, under the base's names, and no
    adapter tensor (hra_u, oft_R, svft_m, ...) is a matrix of its own."""
    from spectune.analyze.sources import from_module

    model, _, _ = build(kind, tmp_path / "m")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn_like(p))
    read = {r.name: r.load().clone() for r in from_module(model).refs}  # merging below works in place
    plain = dict(merged(model).named_parameters())
    assert set(read) == {r.name for r in from_module(tiny_model("qwen2")).refs}
    changed = [n for n, w in read.items() if not torch.equal(w, tiny_model("qwen2").get_parameter(n))]
    assert changed  # the training shows
    for name, w in read.items():
        assert torch.allclose(w, plain[name], atol=1e-5), name


@pytest.mark.parametrize("kind", [k for k, m in METHODS.items() if not m.mergeable])
def test_a_kind_that_cannot_merge_says_why(kind: str) -> None:
    from spectune.train.methods import merge_problem

    assert f"kind {kind} cannot be merged" in (merge_problem(METHODS[kind].config()) or "")


@pytest.mark.parametrize("kind", [k for k, m in METHODS.items() if RANKS in m.plan_sets])
def test_a_rank_plan_sets_the_module_sizes(kind: str, rank_plan: Plan, tmp_path: Path) -> None:
    if kind == "qlora" and needs_bnb:
        pytest.skip("bitsandbytes not installed")
    model, cfg, _ = build(kind, tmp_path / "m", rank_plan)
    lora = rank_plan.lora
    assert lora is not None
    modules = dict(model.named_modules())
    for name, rank in ((t, lora.rank_pattern.get(t, lora.r)) for t in lora.target_modules):
        module = modules[next(n for n in modules if canonical_name(n) == name)]
        if kind == "galore":
            continue  # GaLore's projection ranks live in its optimizer (its own tests)
        if kind == "fourierft":
            entries = module.base_layer.weight.numel()
            assert module.fourierft_spectrum["default"].numel() == scaled_frequencies(64, rank, lora.r, entries)
        elif kind == "loha":
            assert module.hada_w1_a["default"].shape[1] == rank == module.hada_w2_b["default"].shape[0]
            assert module.scaling["default"] == pytest.approx(lora.alpha_pattern.get(name, lora.lora_alpha) / rank)
        elif kind == "lokr":
            assert module.lokr_w2_a["default"].shape[1] == rank
        else:  # the LoRA family (adalora keeps its own budget and is not RANKS)
            assert module.lora_A["default"].weight.shape[0] == rank


@pytest.mark.parametrize("kind", [k for k, m in METHODS.items() if RATES in m.plan_sets and RANKS not in m.plan_sets])
def test_a_kind_with_one_global_size_refuses_a_rank_plan_by_name(kind: str) -> None:
    reason = rf"plan\.policy=adaptive-rank .*method\.kind={kind} has one global size"
    with pytest.raises(TrainConfigError, match=reason):
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": kind}, "plan": {"policy": "adaptive-rank"}})
    load_config({"data": {"name": "sms-spam"}, "method": {"kind": kind}, "plan": {"policy": "alpha-balance"}})


@pytest.mark.parametrize("kind", [k for k, m in METHODS.items() if not m.plan_sets and k != "frozen"])
def test_a_kind_without_weights_refuses_any_plan(kind: str) -> None:
    with pytest.raises(TrainConfigError, match=rf"method\.kind={kind} trains .* and no weight matrix"):
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": kind}, "plan": {"policy": "alpha-balance"}})


def _foreign_key(kind: str) -> tuple[str, str]:
    """A setting some other kind has and ``kind`` does not, with that other kind."""
    own = METHODS[kind].config.model_fields
    for other, spec in METHODS.items():
        for key in spec.config.model_fields:
            if key not in own:
                return key, other
    raise AssertionError(f"every setting of every kind is also one of {kind}")


@pytest.mark.parametrize("kind", list(METHODS))
def test_a_key_of_another_kind_is_a_one_line_error_naming_it(kind: str) -> None:
    key, other = _foreign_key(kind)
    with pytest.raises(TrainConfigError) as err:
        load_config({"data": {"name": "sms-spam"}, "method": {"kind": kind, key: 1}})
    line = next(x for x in str(err.value).splitlines() if f"method.{key}" in x)  # the reason is one line
    assert f"method.{key} is a setting of kind" in line and other in line and f"not of kind {kind}" in line


def test_prefix_tuning_on_an_encoder_classifier_says_why(tmp_path: Path) -> None:
    import transformers as tf

    model = tf.BertForSequenceClassification(tiny_config("bert"))
    cfg = method_config("prefix_tuning")
    reason = "prefix_tuning runs on causal-LM data: .*BertForSequenceClassification.forward does not take"
    with pytest.raises(ValueError, match=reason):
        METHODS["prefix_tuning"].build(model, cfg, build_context(model, cfg, "classification", None, 1))


def test_fourierft_refuses_more_frequencies_than_a_matrix_has(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"method\.n_frequency=600 exceeds the 512 entries of .*k_proj \(16x32\)"):
        build("fourierft", tmp_path, n_frequency=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="PEFT's fbd extension may build where CUDA is")
def test_boft_refuses_butterfly_factors_peft_would_silently_drop(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"method\.boft_n_butterfly_factor=2 needs PEFT's fbd CUDA extension"):
        build("boft", tmp_path, boft_n_butterfly_factor=2)


NEW_KINDS = ("hra", "fourierft", "miss", "randlora", "vera", "oft", "boft", "loha", "lokr", "prefix_tuning", "p_tuning",
             "svft")


@functools.cache
def example_kinds() -> list[str]:
    import yaml

    examples = Path(__file__).parent.parent / "examples"
    return [(yaml.safe_load(p.read_text()).get("method") or {}).get("kind") for p in examples.glob("*.yaml")]


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_each_kind_ships_an_example(kind: str) -> None:
    """One config per kind under examples/ (tests/test_examples.py validates every one)."""
    assert kind in example_kinds()


def test_the_docs_table_of_kinds_is_the_registrys() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "training.md").read_text()
    assert doc_table(doc) == kinds_table(), "rerun: python -m spectune.train.methods.table --write docs/training.md"
    assert all(f"`{k}`" in doc_table(doc) for k in METHODS)


# --- SVFT against its explicit construction ---------------------------------------------------------------------


def _svd(w: torch.Tensor, r: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    n = r or u.shape[1]
    return u[:, :n], vh[:n]


@pytest.mark.parametrize("pattern, d, r", [("plain", 0, None), ("banded", 2, None), ("random", 1, None),
                                           ("top_k", 1, None), ("banded", 1, 5)])
def test_svft_layer_is_w_plus_u_m_vt(pattern: str, d: int, r: int | None) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 12)
    cfg = svft.SvftConfig(pattern=pattern, off_diag=d, r=r)
    layer = svft.svft_layer(base, cfg, torch.Generator().manual_seed(0))
    u, vh = _svd(base.weight.detach(), r)
    n = u.shape[1]
    rows, cols = layer.svft_rows, layer.svft_cols
    assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.numel() == svft.coefficient_count(n, d)
    if pattern in ("plain", "banded"):
        assert ((rows - cols).abs() <= d).all()
    if pattern == "top_k":  # the k best-aligned pairs |u_i . v_j|
        align = (u.T @ vh.T).abs()
        kept = align[rows, cols]
        assert kept.min() >= align.flatten().topk(rows.numel()).values.min() - 1e-9
    values = torch.randn(rows.numel())
    with torch.no_grad():
        layer.svft_m.copy_(values)
    m = torch.zeros(n, n, dtype=torch.float64)
    m[rows, cols] = values.double()
    # singular vectors are unique up to a sign per pair: compare with the layer's own basis, and that basis with
    # torch.linalg.svd's (each u_i, v_i equal up to one common sign)
    signs = torch.sign((layer.svft_u.double() * u).sum(0))
    assert torch.allclose(layer.svft_u.double(), u * signs, atol=1e-5)
    assert torch.allclose(layer.svft_vh.double(), vh * signs[:, None], atol=1e-5)
    u, vh = u * signs, vh * signs[:, None]
    w = base.weight.detach().double() + u @ m @ vh
    x = torch.randn(3, 5, 12)
    expect = x.double() @ w.T + base.bias.detach().double()
    assert torch.allclose(layer(x).double(), expect, atol=1e-4)
    svft.merge(holder := torch.nn.Sequential(layer))
    assert isinstance(holder[0], torch.nn.Linear) and torch.allclose(holder[0](x).double(), expect, atol=1e-4)


def test_svft_top_k_needs_a_square_weight_and_plain_takes_no_off_diagonal() -> None:
    with pytest.raises(ValueError, match="method.pattern=top_k .*square weight; this one is 8 x 12"):
        svft.svft_layer(torch.nn.Linear(12, 8), svft.SvftConfig(pattern="top_k"), torch.Generator())
    with pytest.raises(ValueError, match=r"method\.off_diag=1 with pattern plain"):
        svft.SvftConfig(pattern="plain", off_diag=1)


def test_svft_wraps_gpt2_conv1d_and_merges_to_the_same_function(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    x = torch.randint(0, 128, (2, 7))
    cfg = svft.SvftConfig(pattern="banded", off_diag=1)
    wrapped = svft.build(model, cfg, build_context(model, cfg, "causal_lm", None, 1))
    for p in (p for n, p in wrapped.named_parameters() if n.endswith("svft_m")):
        torch.nn.init.normal_(p, std=0.05)
    before = wrapped(input_ids=x).logits
    assert any(isinstance(m, svft.SvftLayer) for m in wrapped.modules())
    merged = svft.merge(wrapped)
    assert not any(isinstance(m, svft.SvftLayer) for m in merged.modules())
    assert torch.allclose(merged(input_ids=x).logits, before, atol=1e-4)


# --- resume ------------------------------------------------------------------------------------------------------


class Crash(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == 4:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.slow
@pytest.mark.parametrize("kind, task, method, plan", [
    ("hra", "classification", {"r": 2}, {"policy": "alpha-balance", "replan": "never"}),
    ("fourierft", "causal_lm", {"n_frequency": 64, "scaling": 10.0}, {"policy": "adaptive-rank", "replan": "never",
                                                                       "params": {"min_rank": 1, "max_rank": 4}}),
    ("svft", "classification", {"pattern": "banded", "off_diag": 1}, {"policy": "alpha-balance", "replan": "never"}),
    ("p_tuning", "classification", {"num_virtual_tokens": 4}, {}),
])
def test_a_killed_run_resumes_to_the_same_metrics(assets: Path, tmp_path: Path, kind: str, task: str,
                                                  method: dict[str, Any], plan: dict[str, Any]) -> None:
    from spectune.train.run import run

    def cfg(out: Path) -> Any:
        data = "cls.csv" if task == "classification" else "lm.jsonl"
        return load_config({
            "model": {"name": str(assets / ("bert" if task == "classification" else "llama")), "max_length": 16},
            "data": {"path": str(assets / data), "seed": 0, "max_examples": 48}, "method": {"kind": kind, **method},
            "plan": plan, "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "seed": 0}, "eval": {"batch_size": 64},
            "output": {"dir": str(out), "save_every": "steps", "save_every_steps": 3},
            "logging": {"every_steps": 2, "tensorboard": False, "progress": False, "track_metrics": []}})

    ref = run(cfg(tmp_path / "ref"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path / "cut"), extra_callbacks=[Crash()])
    resumed = run(cfg(tmp_path / "cut"), resume=True)
    for k in ("test_loss", "validation_loss"):  # training_loss: the Trainer averages over this call's steps
        assert resumed.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k
    if kind == "svft":  # final/ is the merged plain model: base names, no wrapper
        from safetensors import safe_open

        with safe_open(str(tmp_path / "ref" / "final" / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if "svft_" in k or "base_layer" in k]
        assert any(k.endswith("attention.self.query.weight") for k in keys)
