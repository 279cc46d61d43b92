"""LoRA's data-driven and spectral initialisations, its own optimizers, and the KTO objective (issue 20).

Inits: each data-driven one reads exactly ``method.init_batches`` training batches and
records them in init.json; MiLoRA equals its construction from an explicit SVD.
Optimizers: a plan's per-matrix rate multiplies LoRA+'s B/A ratio (checked on the step
the optimizer takes, not only on its groups), and LoRA-FA's A never moves. KTO: a
short run trains at the plan's rates with a finite loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from spectune.plan import Plan, param_groups
from spectune.train import load_config
from spectune.train.config import TrainConfigError
from spectune.train.methods import apply_method
from spectune.train.methods.lora import LoraConfig, optimizer
from spectune.train.methods.lora_init import minor_factors
from tests.conftest import WORDS, tiny_model
from tests.test_preference import GroupsAtStart, _assert_plan_rates, _cfg, _pairs, lm  # noqa: F401  (lm: fixture)

LR = 1e-3


class CountedBatches:
    """The run's ``train_batches`` for a tiny Llama: a fresh iterator each call, counting the batches drawn."""

    def __init__(self, count: int = 20, rows: int = 4, length: int = 16) -> None:
        self.count, self.rows, self.length, self.drawn = count, rows, length, 0

    def __call__(self) -> Any:
        g = torch.Generator().manual_seed(1)
        for _ in range(self.count):
            ids = torch.randint(0, 128, (self.rows, self.length), generator=g)
            mask = torch.ones_like(ids)
            mask[0, -3:] = 0  # one padded row: its pad tokens are not text
            self.drawn += 1
            yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _lora(init: str = "default", plan: Plan | None = None, tmp: Path | None = None, batches: Any = None,
          **cfg: Any) -> torch.nn.Module:
    method = LoraConfig(r=4, init=init, **cfg)
    return apply_method(tiny_model("llama"), method, "causal_lm", plan, 10, run_dir=tmp, train_batches=batches)


def _rate_plan(model: torch.nn.Module, ranks: bool = False) -> Plan:
    """Per-matrix rates 0.5 .. 1.5 over the tiny Llama's block linears (and their ranks 2 / 6 with ``ranks``)."""
    from spectune.plan.schema import LoraDecision

    names = [n.removesuffix(".weight") for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
    scale = {n + ".weight": 0.5 + i / max(len(names) - 1, 1) for i, n in enumerate(names)}
    lora = LoraDecision(target_modules=names, r=4, lora_alpha=8, rank_pattern={n: 2 + 4 * (i % 2) for i, n in enumerate(names)})
    return Plan(spectune_version="0", model="tiny", analysis_digest="d", policy="adaptive-rank", lr_scale=scale, max_scale=1.5,
                lora=lora if ranks else None)


# --- initialisations --------------------------------------------------------------------------------


def test_milora_factors_are_the_smallest_triplets_of_an_explicit_svd() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 20))
    r, scaling = 3, 2.0
    a, b, residual = minor_factors(torch.tensor(w), r, scaling)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[-r:] / scaling)
    want_a, want_b = root[:, None] * vh[-r:], u[:, -r:] * root[None, :]
    signs = np.sign(np.sum(a.numpy() * want_a, axis=1))  # each singular pair is defined up to a joint sign
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(a.numpy(), signs[:, None] * want_a, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), want_b * signs[None, :], atol=1e-10)
    np.testing.assert_allclose(residual.numpy() + scaling * b.numpy() @ a.numpy(), w, atol=1e-12)
    # what the adapter holds is the minor part: its singular values are W's smallest r
    np.testing.assert_allclose(np.linalg.svd(scaling * b.numpy() @ a.numpy(), compute_uv=False)[:r], s[-r:],
                               rtol=1e-9)


def test_milora_on_a_model_keeps_the_function_and_the_plan_ranks(tmp_path: Path) -> None:
    base = tiny_model("llama")
    plan = _rate_plan(base, ranks=True)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = base(input_ids=x).logits
    model = apply_method(base, LoraConfig(init="milora"), "causal_lm", plan, 10, run_dir=tmp_path)
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.r["default"] == plan.lora.rank_pattern["model.layers.0.self_attn.q_proj"]  # type: ignore[union-attr]
    r, delta = q.r["default"], q.scaling["default"] * (q.lora_B["default"].weight @ q.lora_A["default"].weight).double()
    smallest = torch.linalg.svdvals(q.base_layer.weight.detach().double() + delta)[-r:]  # W's own smallest r
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:r], smallest, atol=1e-5, rtol=1e-4)
    record = json.loads((tmp_path / "init.json").read_text())
    assert record["batches_used"] == 0 and record["base_rewritten"]


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_a_data_init_reads_the_stated_batches_and_records_them(init: str, tmp_path: Path) -> None:
    batches = CountedBatches()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = tiny_model("llama")(input_ids=x).logits
    model = _lora(init, tmp=tmp_path, batches=batches, init_batches=3)
    record = json.loads((tmp_path / "init.json").read_text())
    assert batches.drawn == 3  # no more than asked for was even collated
    assert record["init"] == init and record["init_batches"] == 3 and record["batches_used"] == 3
    assert record["rows"] == 12 and record["tokens"] == 3 * 4 * 16 - 3 * 3 and record["seconds"] > 0
    assert record["forward_passes"] >= 3 and record["base_rewritten"] == (init != "eva")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = q.lora_A["default"].weight.detach(), q.lora_B["default"].weight.detach()
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)  # every init leaves step 0's function alone
    if init == "eva":  # A's rows: orthonormal principal directions of the layer's inputs, B = 0
        assert torch.count_nonzero(b) == 0
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
    else:  # the adapter starts non-zero and the base holds the rest
        assert b.abs().max() > 0
        assert not torch.equal(q.base_layer.weight, tiny_model("llama").model.layers[0].self_attn.q_proj.weight)


def test_a_data_init_follows_the_batches_it_reads(tmp_path: Path) -> None:
    """Other batches give another EVA basis: the init reads the data, not only the weights."""
    first = _lora("eva", batches=CountedBatches(), init_batches=2)

    def shifted() -> Any:
        for b in CountedBatches()():
            yield {k: (v + 7) % 128 if k == "input_ids" else v for k, v in b.items()}

    second = _lora("eva", batches=shifted, init_batches=2)
    a1 = first.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight
    a2 = second.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight
    assert not torch.allclose(a1, a2, atol=1e-3)


def test_a_data_init_without_training_batches_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^method\.init=eva .*collates none"):
        _lora("eva", tmp=tmp_path, batches=None)
    with pytest.raises(ValueError, match=r"^method\.init=corda .*training split has no rows"):
        _lora("corda", tmp=tmp_path, batches=lambda: iter([]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^method\.init=loftq cannot run here: .*CUDA"):
            _lora("loftq", tmp=tmp_path)


@pytest.mark.parametrize("method, field", [
    ({"kind": "lora", "init": "eva", "objective": "dpo"}, "method.init=eva"),
    ({"kind": "lora", "init_batches": 4}, "method.init_batches"),
    ({"kind": "lora", "loraplus_lr_ratio": 4}, "method.loraplus_lr_ratio"),
    ({"kind": "dora", "optimizer": "lorafa"}, "method.optimizer=lorafa"),
    ({"kind": "qlora", "init": "corda"}, "method.init=corda"),
    ({"kind": "qlora", "optimizer": "loraplus"}, "method.optimizer=loraplus"),
    ({"kind": "lora", "init": "lora-ga"}, "lora-ga"),
    ({"kind": "lora", "objective": "kto", "loss_type": "ipo"}, "kto loss"),
])
def test_settings_that_cannot_run_are_refused_naming_the_field(method: dict[str, Any], field: str) -> None:
    with pytest.raises(TrainConfigError, match=field.replace(".", r"\.")):
        load_config({"data": {"name": "trec"}, "method": method})


def test_a_stored_config_with_every_default_reads_back() -> None:
    """config.yaml writes every field; the defaults of init_batches and loraplus_lr_ratio are not choices."""
    cfg = load_config({"data": {"name": "trec"}, "method": {"kind": "lora", "init": "pissa"}})
    assert load_config(json.loads(json.dumps(cfg.model_dump(mode="json")))).method.init == "pissa"


# --- optimizers -------------------------------------------------------------------------------------


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Each trainable parameter's change over one step with a unit-magnitude gradient (Adam's first step is
    lr x sign(g) there, so the change reads back the rate the parameter stepped at)."""
    g = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)
    opt.step()
    return {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}


def test_loraplus_steps_b_at_plan_scale_times_base_times_ratio() -> None:
    model = _lora(optimizer="loraplus", loraplus_lr_ratio=8.0)
    plan = _rate_plan(tiny_model("llama"))
    groups = param_groups(model, plan, LR, 0.0)
    opt = optimizer(model, groups, LR, {"betas": (0.9, 0.999), "eps": 1e-8},
                    LoraConfig(r=4, optimizer="loraplus", loraplus_lr_ratio=8.0))
    change = _one_step(model, opt)
    scales = {g["name"]: g["lr_scale"] for g in groups}
    seen = {"A": 0, "B": 0}
    for group in opt.param_groups:
        name = group["name"]
        if ".lora_" not in name:
            continue
        side = "B" if ".lora_B." in name else "A"
        ratio = 8.0 if side == "B" else 1.0
        assert group["lr"] == pytest.approx(LR * scales[name])  # the plan's rate, restored after the step
        assert group["lr_ratio"] == ratio
        stepped = change[name]
        torch.testing.assert_close(stepped, torch.full_like(stepped, LR * scales[name] * ratio), rtol=1e-4, atol=0)
        seen[side] += 1
    assert seen["A"] == seen["B"] == 14
    assert len({round(s, 6) for s in scales.values()}) > 2  # a real per-matrix plan


def test_loraplus_without_a_plan_splits_the_trainers_groups() -> None:
    model = _lora(optimizer="loraplus")
    decay = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = optimizer(model, [{"params": decay, "weight_decay": 0.0}], LR, {}, LoraConfig(optimizer="loraplus"))
    assert sorted(g["lr_ratio"] for g in opt.param_groups) == [1.0, 16.0]
    change = _one_step(model, opt)
    b = next(v for n, v in change.items() if ".lora_B." in n)
    a = next(v for n, v in change.items() if ".lora_A." in n)
    assert b.mean() == pytest.approx(16 * LR, rel=1e-4) and a.mean() == pytest.approx(LR, rel=1e-4)


def test_lorafa_keeps_a_frozen_and_steps_b_at_its_plan_rate() -> None:
    model = _lora(optimizer="lorafa")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    plan = _rate_plan(tiny_model("llama"))
    groups = param_groups(model, plan, LR, 0.0)
    opt = optimizer(model, groups, LR, {"betas": (0.9, 0.999), "eps": 1e-8}, LoraConfig(r=4, optimizer="lorafa"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    b_start = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    x = torch.randint(0, 128, (2, 12))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]  # B alone learns the batch
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(p, b_start[n]) for n, p in model.named_parameters() if n in b_start)
    scales = {g["name"]: g["lr_scale"] for g in groups}
    for group in opt.param_groups:
        assert [n.split(".lora_")[1][0] for n in group["names"]] == ["A", "B"]  # each B after its A
        assert group["lr"] == pytest.approx(LR * scales[group["name"]])
    assert len(opt.param_groups) == 14


class RatiosAtEpochStart(TrainerCallback):
    """Each LoRA group's (lr / plan-scale, lr_ratio) at the first step of every epoch, after any re-plan."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, tuple[float, float]]] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        epoch = int(state.epoch or 0)
        if epoch not in self.seen:
            self.seen[epoch] = {g["name"]: (g["lr_scale"], g.get("lr_ratio", 1.0)) for g in optimizer.param_groups
                                if ".lora_" in g.get("name", "")}


@pytest.mark.slow
def test_a_run_initialises_from_its_batches_and_keeps_the_loraplus_ratio_through_replans(assets: Path,
                                                                                         tmp_path: Path) -> None:
    """Through ``spectune train``: EVA reads the run's own first batches (a classifier's: no per-token labels),
    and a re-plan moves the plan rates while LoRA+'s ratio stays on B."""
    from spectune.train.run import run

    out = tmp_path / "run"
    cfg = load_config({
        "model": {"name": str(assets / "bert"), "max_length": 16}, "data": {"path": str(assets / "cls.csv")},
        "method": {"kind": "lora", "r": 4, "init": "eva", "init_batches": 2, "optimizer": "loraplus",
                   "loraplus_lr_ratio": 4},
        "plan": {"policy": "phased", "replan": "epoch"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3}, "eval": {"batch_size": 64, "final_splits": ["test"]},
        "output": {"dir": str(out), "save_every": "no"},
        "logging": {"tensorboard": False, "progress": False, "track_metrics": []}})
    probe = RatiosAtEpochStart()
    result = run(cfg, extra_callbacks=[probe])
    record = json.loads((out / "init.json").read_text())
    assert record["init"] == "eva" and record["batches_used"] == 2 and record["rows"] == 32
    assert set(probe.seen) == {0, 1} and result.plans  # re-planned after the first epoch
    for epoch, groups in probe.seen.items():
        assert groups and all(ratio == (4.0 if ".lora_B." in name else 1.0) for name, (_, ratio) in groups.items())
    moved = [n for n in probe.seen[0] if probe.seen[0][n][0] != pytest.approx(probe.seen[1][n][0])]
    assert moved  # the re-plan changed rates, and the ratio above survived it
    assert np.isfinite(result.metrics["test_loss"])


class Crash(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(assets: Path, tmp_path: Path) -> None:
    """On resume the init is rebuilt from the same batches (LoRA-GA's rewritten base too) and LoRA-FA's optimizer
    state, keyed by parameter name rather than by parameter, comes back from the checkpoint."""
    from spectune.train.run import run

    def cfg(out: Path) -> Any:
        return load_config({
            "model": {"name": str(assets / "bert"), "max_length": 16}, "data": {"path": str(assets / "cls.csv")},
            "method": {"kind": "lora", "r": 4, "init": "lora_ga", "init_batches": 2, "optimizer": "lorafa"},
            "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3}, "eval": {"batch_size": 64, "final_splits": ["test"]},
            "output": {"dir": str(out), "save_every": "steps", "save_every_steps": 3},
            "logging": {"tensorboard": False, "progress": False, "track_metrics": []}})

    ref = run(cfg(tmp_path / "ref"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path / "cut"), extra_callbacks=[Crash()])
    resumed = run(cfg(tmp_path / "cut"), resume=True)
    for k in ("test_loss", "test_accuracy"):
        assert resumed.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k


# --- KTO --------------------------------------------------------------------------------------------


def test_kto_rows_are_the_pairs_unpaired_and_shuffled() -> None:
    import datasets

    from spectune.train.recipes.kto import unpair

    pairs = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)], "chosen": [f"c{i}" for i in range(10)],
                                        "rejected": [f"r{i}" for i in range(10)]})
    rows = unpair(pairs, seed=0)
    assert len(rows) == 20 and sum(rows["label"]) == 10
    for row in rows:
        assert row["completion"] == row["prompt"].replace("p", "c" if row["label"] else "r")
    assert rows["label"][:10] != [True] * 10  # desirable and undesirable rows mix from the first batch
    assert list(unpair(pairs, seed=0)["completion"]) == list(rows["completion"])


def _unpaired(path: Path, labels: list[Any] | None = None) -> Path:
    """The learnable pairs of the preference tests as TRL's unpaired rows (prompt, completion, label)."""
    pairs = pd.read_json(_pairs(path.with_suffix(".pairs.jsonl")), lines=True)
    rows = [{"prompt": r.prompt, "completion": reply, "label": good} for r in pairs.itertuples()
            for reply, good in ((r.chosen, True), (r.rejected, False))]
    for row, label in zip(rows, labels or []):
        row["label"] = label
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return path


def test_a_file_of_unpaired_rows_is_carved_by_prompt(tmp_path: Path) -> None:
    from spectune.train.data import DataConfig, DataError
    from spectune.train.recipes.kto import unpaired_file

    path = _unpaired(tmp_path / "rows.jsonl", labels=["true", 0, "1", "FALSE", True])
    rows = unpaired_file(DataConfig(path=str(path)))
    assert rows is not None and len(rows.train) + len(rows.validation) + len(rows.test) == 80
    assert not set(rows.train["prompt"]) & (set(rows.test["prompt"]) | set(rows.validation["prompt"]))
    for split in (rows.train, rows.validation, rows.test):
        for row in split:
            assert row["label"] is (row["completion"].split()[0] in WORDS[0].split())
    assert unpaired_file(DataConfig(path=str(_pairs(tmp_path / "pairs.jsonl")))) is None  # pairs: the pair loader's
    with pytest.raises(DataError, match=r"row 1: label 'maybe' is not a desirable flag"):
        unpaired_file(DataConfig(path=str(_unpaired(tmp_path / "bad.jsonl", labels=[True, "maybe"]))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_kto_under_a_plan_trains_at_its_rates(kind: str, lm: Path, tmp_path: Path) -> None:
    """LoRA on pairs (the reference is the adapter switched off); full tuning on a file of unpaired rows (the
    reference a frozen copy of the loaded model)."""
    from spectune.train.run import run

    groups = GroupsAtStart()
    out = tmp_path / "kto"
    data = _pairs(tmp_path / "p.jsonl") if kind == "lora" else _unpaired(tmp_path / "rows.jsonl")
    cfg = _cfg(lm, data, out, method={"kind": kind, "objective": "kto", "beta": 0.2, "undesirable_weight": 1.5},
               train={"epochs": 1})
    result = run(cfg, extra_callbacks=[groups])
    plan = Plan.load(next((out / "plans").glob("plan-epoch0-*.yaml")))
    _assert_plan_rates(groups.groups, plan, cfg.train.lr)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "kto" and np.isfinite(result.metrics["training_loss"])
    assert np.isfinite(result.metrics["test_loss"])
    assert result.metrics["test_rewards/margins"] > 0  # held-out desirable replies now out-score undesirable ones
    assert not (out / "final" / "ref").exists()  # TRL's frozen reference adapter is not saved


def test_kto_needs_two_rows_a_batch(lm: Path, tmp_path: Path) -> None:
    from spectune.train.run import run

    cfg = _cfg(lm, _pairs(tmp_path / "p.jsonl"), tmp_path / "o", method={"kind": "lora", "objective": "kto"},
               train={"batch_size": 1})
    with pytest.raises(ValueError, match=r"^train\.batch_size=1: method\.objective=kto"):
        run(cfg)
