"""LISA, GaLore and MeZO (issue 21) on tiny models: what trains, what the optimizer keeps, and what is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from spectune.plan import Plan
from spectune.train.config import ConfigError, load_config
from spectune.train.methods import apply_method, plan_problem
from spectune.train.methods.galore import GaloreConfig, optimizer as galore_optimizer, projection_ranks
from spectune.train.methods.galore import build as galore_build
from spectune.train.methods.lisa import BLOCKS_FILE, LisaConfig, block_probabilities, draw
from spectune.train.methods.lisa_outliers import block_outlier_ratios, input_norms, outlier_ratio
from spectune.train.methods.mezo import spsa_step, step_seed
from spectune.train.run import run
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def llama4(assets, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A 4-block tiny Llama with MiniLM's tokenizer (tied embeddings, as SmolLM2), so sampling has blocks to choose."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("llama4")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True))
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(assets / "llama" / f, folder / f)
    return folder


def _cfg(model: Path, assets: Path, out: Path, method: dict, **over):  # type: ignore[no-untyped-def]
    base = {
        "model": {"name": str(model), "max_length": 32},
        "data": {"path": str(assets / "lm.jsonl"), "seed": 0},
        "method": method,
        "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, "seed": 0},
        "eval": {"batch_size": 32, "every": "no", "final_splits": ["test"]},
        "output": {"dir": str(out), "save_every": "no", "save_final": False},
        "logging": {"every_steps": 2, "tensorboard": False, "progress": False, "track_metrics": []},
    }
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_config(base)


def _names(model: torch.nn.Module, params: object) -> set[str]:
    ids = {id(p) for p in params}  # type: ignore[attr-defined]
    return {n for n, p in model.named_parameters() if id(p) in ids}


class StepProbe(TrainerCallback):
    """Per optimizer step: the parameters holding a gradient (before the update) and optimizer state (after it)."""

    def __init__(self) -> None:
        self.grads: list[set[str]] = []
        self.state: list[set[str]] = []
        self.groups: list[dict] = []
        self.grad_numel: list[int] = []

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kw):  # type: ignore[no-untyped-def]
        self.groups = [{**{k: v for k, v in g.items() if k != "params"}, "names": _names(model, g["params"])}
                       for g in optimizer.param_groups]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
        self.grads.append({n for n, p in model.named_parameters() if p.grad is not None})
        self.grad_numel.append(sum(p.numel() for p in model.parameters() if p.grad is not None))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):  # type: ignore[no-untyped-def]
        self.state.append(_names(model, [p for p, s in optimizer.state.items() if s]))


def _intervals(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / BLOCKS_FILE).read_text().splitlines()]


# --------------------------------------------------------------------------------------------- LISA


@pytest.mark.parametrize("always", [["embeddings", "head", "norms"], []])
def test_lisa_only_the_sampled_blocks_carry_gradients_and_optimizer_state(assets, llama4, tmp_path, always):  # type: ignore[no-untyped-def]
    probe = StepProbe()
    out = tmp_path / "run"
    cfg = _cfg(llama4, assets, out, {"kind": "lisa", "layers": 2, "interval_steps": 1, "always_train": always})
    run(cfg, extra_callbacks=[probe])
    intervals = _intervals(out)
    assert [i["interval"] for i in intervals] == list(range(8))  # K = 1: a fresh draw at every step
    uniform = np.full(4, 0.25)
    assert [i["blocks"] for i in intervals] == [draw(0, i, uniform, 2) for i in range(8)]
    assert len({b for i in intervals for b in i["blocks"]}) == 4  # every block was active at some point...
    outside = {"model.embed_tokens.weight", "model.norm.weight"} if always else set()
    for step, rec in enumerate(intervals):
        active = {n for n in probe.grads[step] if ".layers." in n}
        assert {int(n.split(".")[2]) for n in active} == set(rec["blocks"])
        assert probe.grads[step] - active == outside
        # ...but the optimizer only ever holds the current two blocks (and what always trains)
        assert probe.state[step] == probe.grads[step]
    assert len(probe.state[-1]) == len(outside) + 2 * 9  # 9 tensors a Llama block
    # the cost records what trains at once (two blocks and what always trains), not all LISA may train
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters_active"] == max(probe.grad_numel) < summary["trainable_parameters"]


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.slow
def test_lisa_sampling_is_reproducible_and_a_resumed_run_continues_it(assets, llama4, tmp_path):  # type: ignore[no-untyped-def]
    method = {"kind": "lisa", "layers": 1, "interval_steps": 2}
    over = dict(train={"max_steps": 9}, output={"save_every": "steps", "save_every_steps": 3})
    ref = run(_cfg(llama4, assets, tmp_path / "ref", method, **over))
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(llama4, assets, tmp_path / "cut", method, **over), extra_callbacks=[Crash()])
    resumed = run(_cfg(llama4, assets, tmp_path / "cut", method, **over), resume=True)  # from checkpoint-3, mid-interval
    assert _intervals(tmp_path / "cut") == _intervals(tmp_path / "ref")
    assert [i["first_step"] for i in _intervals(tmp_path / "ref")] == [0, 2, 4, 6, 8]
    assert resumed.metrics["test_loss"] == pytest.approx(ref.metrics["test_loss"], rel=1e-5)


def test_lisa_block_probabilities_follow_the_plan_in_either_direction() -> None:
    assert block_probabilities(np.array([2.0, 0.5]), "prefer-high", 1) == pytest.approx([0.8, 0.2])
    assert block_probabilities(np.array([2.0, 0.5]), "prefer-low", 1) == pytest.approx([0.2, 0.8])
    assert block_probabilities(np.array([1.0, 0.0, 3.0]), "prefer-low", 2) == pytest.approx([0.75, 0.0, 0.25])
    with pytest.raises(ValueError, match=r"method.layers=2: only 1 blocks score above 0"):
        block_probabilities(np.array([1.0, 0.0]), "prefer-high", 2)
    draws = [draw(7, i, np.array([0.7, 0.1, 0.1, 0.1]), 1)[0] for i in range(2000)]
    assert np.mean(np.array(draws) == 0) == pytest.approx(0.7, abs=0.04)
    assert draw(7, 3, np.full(4, 0.25), 2) == draw(7, 3, np.full(4, 0.25), 2) != draw(8, 3, np.full(4, 0.25), 2)


def test_lisa_plan_sampling_reads_the_rate_plan_and_the_rates_compose() -> None:
    model = tiny_model("llama")
    scale = {n: (2.0 if ".layers.0." in n else 0.5) for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n}
    plan = Plan(spectune_version="0", model="m", analysis_digest="d", policy="alpha-balance", max_scale=2.0,
                lr_scale=scale)
    from spectune.train.methods.lisa import layout
    from spectune.train.methods import build_context

    for direction, want in (("prefer-high", [0.8, 0.2]), ("prefer-low", [0.2, 0.8])):
        cfg = LisaConfig(layers=1, sampling="plan", direction=direction)
        lay = layout(model, cfg, build_context(model, cfg, "causal_lm", plan, 10))
        assert lay.probabilities == pytest.approx(want)


def test_lisa_plan_sampling_in_a_run_trains_active_blocks_at_their_planned_rates(assets, llama4, tmp_path):  # type: ignore[no-untyped-def]
    probe = StepProbe()
    out = tmp_path / "run"
    cfg = _cfg(llama4, assets, out, {"kind": "lisa", "layers": 1, "interval_steps": 4, "sampling": "plan",
                                     "direction": "prefer-low"},
               plan={"policy": "alpha-balance", "replan": "never"}, train={"max_steps": 4})
    run(cfg, extra_callbacks=[probe])
    plan = yaml_load(out / "plans" / "plan-epoch0-step0.yaml")
    block = _intervals(out)[0]["blocks"][0]
    groups = {next(iter(g["names"])): g for g in probe.groups}
    for name in probe.grads[0]:
        if f".layers.{block}." in name and name in plan["lr_scale"]:
            assert groups[name]["lr_scale"] == pytest.approx(plan["lr_scale"][name])


def test_outlier_ratio_is_owls_share_above_m_times_the_blocks_joint_mean() -> None:
    """LOD against a hand count: the mean is over every linear of the block together, not per matrix."""
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 30.0]])  # mean 4.625: 30 > 5 x 4.625 = 23.1
    b = torch.ones(2, 2)
    assert outlier_ratio([a, b], 5.0) == pytest.approx(1 / 12)
    assert outlier_ratio([a], 7.0) == 0.0  # alone, a's mean is 4.625 and 30 < 7 x 4.625
    assert outlier_ratio([b], 1.5) == 0.0


def test_block_outlier_ratios_weigh_weights_by_the_input_norms_of_the_calibration_tokens() -> None:
    """A planted outlier column in one block's weight, fed by a loud input feature, makes that block the most
    likely draw; the same ratio from an explicit |W| ||X_j|| over the hooked inputs."""
    model = tiny_model("llama").eval()  # 2 blocks
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[:, 3] *= 200.0
    rows = [{"input_ids": torch.randint(5, 128, (1, 12), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    ratios = block_outlier_ratios(model, [0, 1], rows, threshold=13.0)
    assert ratios[1] > ratios[0] >= 0.0
    p = block_probabilities(ratios, "prefer-high", 1)
    assert p[1] == max(p)
    layer = model.model.layers[1].self_attn.q_proj
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for row in rows:
            model(**row)
    handle.remove()
    norms = torch.cat(seen).double().pow(2).sum(0).sqrt()
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".layers.1." in f".{n}"}
    got = input_norms(model, {"q": layer}, rows)["q"]
    assert torch.allclose(got, norms)
    assert len(linears) == 7


def test_lisa_outlier_sampling_in_a_run_records_scores_and_draws_from_them(assets, llama4, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    # a random tiny model has no entries 13 times its blocks' mean (a pretrained one has): M = 3 here
    cfg = _cfg(llama4, assets, out, {"kind": "lisa", "layers": 1, "interval_steps": 2, "sampling": "outliers",
                                     "calibration_batches": 2, "outlier_threshold": 3.0}, train={"max_steps": 4})
    run(cfg)
    sampling = json.loads((out / "lisa_sampling.json").read_text())
    assert sampling["sampling"] == "outliers" and sampling["blocks"] == [0, 1, 2, 3]
    scores = np.array(sampling["scores"])
    assert (scores >= 0).all() and (scores <= 1).all() and scores.sum() > 0
    p = block_probabilities(scores, "prefer-high", 1)
    assert sampling["probabilities"] == pytest.approx(list(p))
    assert [i["blocks"] for i in _intervals(out)] == [draw(0, i, p, 1) for i in range(2)]


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_lisa_bad_settings_are_refused_in_one_line() -> None:
    model = tiny_model("llama")  # 2 blocks
    with pytest.raises(ValueError, match=r"^method.layers=3 is more than the model's 2 transformer blocks$"):
        apply_method(model, LisaConfig(layers=3), "causal_lm", None, 10)
    with pytest.raises(ValueError, match=r"^method.sampling=plan draws blocks by their planned rates, but the run has no plan"):
        apply_method(model, LisaConfig(layers=1, sampling="plan"), "causal_lm", None, 10)
    with pytest.raises(ConfigError, match=r"method.lisa.interval_steps: .*method.interval_steps=0: LISA redraws"):
        load_config({"data": {"name": "trec"}, "method": {"kind": "lisa", "interval_steps": 0}})
    select = Plan(spectune_version="0", model="m", analysis_digest="d", policy="select", trainable=[])
    with pytest.raises(ValueError, match=r"^plan.policy=select decides the trainable set, but method.kind=lisa samples it"):
        apply_method(model, LisaConfig(layers=1), "causal_lm", select, 10)
    assert "decides per-module ranks" in (plan_problem("lisa", "adaptive-rank", {}, False) or "")
    with pytest.raises(ValueError, match=r"^method.sampling=outliers reads activations from the run's training batches"):
        apply_method(model, LisaConfig(layers=1, sampling="outliers"), "causal_lm", None, 10)


# --------------------------------------------------------------------------------------------- GaLore


def _lm_batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (4, 12), generator=gen) for _ in range(n)]


def test_galore_steps_with_one_rank_equal_galore_torchs_own_optimizer() -> None:
    from galore_torch import GaLoreAdamW

    ours, ref = tiny_model("llama"), tiny_model("llama")
    cfg = GaloreConfig(rank=4, update_proj_gap=2, scale=0.25)
    ours = galore_build(ours, cfg, apply_context(ours, cfg))
    opt = galore_optimizer(ours, [{"params": list(ours.parameters()), "weight_decay": 0.0}], 1e-2,
                           {"betas": (0.9, 0.999), "eps": 1e-6}, cfg)
    # galore-torch's README: the targeted matrices in one group with the rank, the rest in another
    targets = {n for n in projection_ranks(ref, cfg, None)}
    named = list(ref.named_parameters())
    reference = GaLoreAdamW([{"params": [p for n, p in named if n not in targets]},
                             {"params": [p for n, p in named if n in targets], "rank": 4, "update_proj_gap": 2,
                              "scale": 0.25, "proj_type": "std"}], lr=1e-2, no_deprecation_warning=True)
    for batch in _lm_batches(5):  # 5 steps: the projections are recomputed at steps 0, 2 and 4
        for model, o in ((ours, opt), (ref, reference)):
            model.train()
            model(input_ids=batch, labels=batch).loss.backward()
            o.step()
            o.zero_grad()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    assert len(targets) == 14 and len(opt.param_groups) == 1 + 14  # one group per projected matrix


def apply_context(model: torch.nn.Module, cfg: GaloreConfig, plan: Plan | None = None):  # type: ignore[no-untyped-def]
    from spectune.train.methods import build_context

    return build_context(model, cfg, "causal_lm", plan, 10)


def test_galore_planned_ranks_set_each_matrix_and_its_state_is_rank_over_short_side(assets, llama4, tmp_path):  # type: ignore[no-untyped-def]
    class StateProbe(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, optimizer=None, **kw):  # type: ignore[no-untyped-def]
            names = {id(p): n for n, p in model.named_parameters()}
            self.ranks = {names[id(g["params"][0])]: g["rank"] for g in optimizer.param_groups if "rank" in g}
            self.state = {names[id(p)]: (p.shape, s["exp_avg"].numel() + s["exp_avg_sq"].numel())
                          for p, s in optimizer.state.items() if "exp_avg" in s}
            self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    probe = StateProbe()
    out = tmp_path / "run"
    cfg = _cfg(llama4, assets, out, {"kind": "galore", "update_proj_gap": 3},
               plan={"policy": "adaptive-rank", "params": {"min_rank": 2, "max_rank": 8, "top_fraction": 1.0},
                     "replan": "never"}, train={"max_steps": 4})
    run(cfg, extra_callbacks=[probe])
    lora = yaml_load(out / "plans" / "plan-epoch0-step0.yaml")["lora"]
    planned = {t + ".weight": lora["rank_pattern"].get(t, lora["r"]) for t in lora["target_modules"]}
    assert probe.ranks == planned and len(set(planned.values())) > 1  # each matrix its own rank
    for name, r in planned.items():
        shape, held = probe.state[name]
        assert held == 2 * r * max(shape) <= 2 * shape[0] * shape[1] * r / min(shape)  # AdamW's 2mn times r/min(m,n)
    # a rank plan is read as under LoRA: the embeddings (tied head) stay frozen, the norms train
    assert "model.embed_tokens.weight" not in probe.trainable and "model.norm.weight" in probe.trainable


def test_galore_bad_targets_and_ranks_are_refused_in_one_line() -> None:
    model = tiny_model("llama")  # hidden 32; k/v projections 16 x 32
    with pytest.raises(ValueError, match=r"^method.target_modules selects model.layers.0.input_layernorm.weight, "
                                         r"a 1-D parameter; GaLore projects matrices$"):
        galore_build(model, GaloreConfig(rank=4, target_modules=["input_layernorm"]), apply_context(model, GaloreConfig()))
    with pytest.raises(ValueError, match=r"^method.rank gives model.layers.0.self_attn.k_proj.weight rank 20, above its "
                                         r"short side 16 \(16 x 32\)"):
        galore_build(model, GaloreConfig(rank=20), apply_context(model, GaloreConfig()))


# --------------------------------------------------------------------------------------------- MeZO


def test_mezo_loss_falls_on_a_batch_the_model_can_memorise() -> None:
    model = tiny_model("llama").eval()
    batch = _lm_batches(1)[0]
    params = [(p, 3e-3, 0.0) for p in model.parameters()]
    loss = lambda: model(input_ids=batch, labels=batch).loss  # noqa: E731
    with torch.no_grad():
        start = loss().item()
    for step in range(150):
        spsa_step(loss, params, step_seed(0, step), 1e-3)
    with torch.no_grad():
        assert loss().item() < start - 0.2
    assert step_seed(0, 5) == step_seed(0, 5) != step_seed(0, 6)


def test_mezo_trains_through_a_run_without_ever_calling_backward(assets, llama4, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    calls = []
    real = torch.autograd.backward

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd, "backward", spy)
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    assert calls == [1]  # the spy sees a backward (Tensor.backward goes through it)
    calls.clear()

    class End(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
            self.grads = [n for n, p in model.named_parameters() if p.grad is not None]
            self.weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()

    end = End()
    out = tmp_path / "run"
    run(_cfg(llama4, assets, out, {"kind": "mezo", "eps": 1e-3}), extra_callbacks=[end])
    assert calls == [] and end.grads == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_state_parameters"] == 0 and summary["global_step"] == 8
    import transformers as tf

    start = tf.LlamaForCausalLM.from_pretrained(llama4).model.layers[0].mlp.up_proj.weight
    assert not torch.equal(end.weight, start)  # it trained


def test_mezo_refuses_a_preference_objective_and_gradient_accumulation(assets, llama4, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"method.objective=dpo: method.kind=mezo steps on a scalar loss"):
        load_config({"data": {"name": "trec"}, "method": {"kind": "mezo", "objective": "dpo"}})
    with pytest.raises(ValueError, match=r"^train.grad_accum > 1: method.kind=mezo takes one SPSA step per batch"):
        run(_cfg(llama4, assets, tmp_path / "run", {"kind": "mezo"}, train={"grad_accum": 2}))
