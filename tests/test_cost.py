"""Cost measures: the CostCallback under a plain transformers Trainer on a tiny real model, and the memory helpers."""

from __future__ import annotations

import math

import pytest
import torch

from spectune import _memory
from spectune.train.cost import CostCallback
from tests.conftest import tiny_config


def _train(tmp_path, freeze_base: bool, steps: int = 4):  # type: ignore[no-untyped-def]
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tiny_config("bert"))
    model.config.num_labels = 2
    if freeze_base:
        model.bert.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 128, (12,), generator=g), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(32)]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                                learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                                use_cpu=True, disable_tqdm=True, optim="adamw_torch")
    cost = CostCallback()
    tf.Trainer(model=model, args=args, train_dataset=rows, callbacks=[cost]).train()
    return model, cost


@pytest.mark.parametrize("freeze_base", [False, True])
def test_cost_callback_counts_adamw_state_and_times_steps_after_the_first(tmp_path, freeze_base):  # type: ignore[no-untyped-def]
    model, cost = _train(tmp_path, freeze_base)
    trained = [p for p in model.parameters() if p.requires_grad]
    # AdamW keeps exp_avg and exp_avg_sq (one element each per trained element) and a scalar step per tensor
    expected = sum(2 * p.numel() + 1 for p in trained)
    s = cost.summary()
    assert s["optimizer_state_parameters"] == expected
    assert s["optimizer_state_mb"] == pytest.approx(expected * 4 / 2**20)  # all float32
    if freeze_base:  # only the classifier trains: the state is the head's, not the model's
        assert expected == 2 * (32 * 2 + 2) + 2
    assert len(cost.step_seconds) == 3 and cost.first_step_s is not None  # 4 steps, the warm-up one kept apart
    assert s["seconds_per_step"] == pytest.approx(sum(cost.step_seconds) / 3) and 0 < s["seconds_per_step"] < 5
    assert (s["peak_gpu_memory_mb"] is None) == (not torch.cuda.is_available())


def test_a_single_step_run_reports_that_step(tmp_path):  # type: ignore[no-untyped-def]
    _, cost = _train(tmp_path, freeze_base=True, steps=1)
    assert cost.step_seconds == [] and cost.summary()["seconds_per_step"] == cost.first_step_s > 0


def test_optimizer_state_numel_reads_the_real_state():
    w = torch.nn.Parameter(torch.ones(3, 4))
    plain = torch.optim.SGD([w], lr=0.1)
    momentum = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    assert _memory.optimizer_state_numel(plain) == 0  # nothing before a step
    for opt in (plain, momentum):
        w.grad = torch.ones_like(w)
        opt.step()
    assert _memory.optimizer_state_numel(plain) == 0  # plain SGD keeps no state
    assert _memory.optimizer_state_numel(momentum) == 12  # one momentum buffer
    assert _memory.optimizer_state_mb(momentum) == pytest.approx(48 / 2**20)


def test_cuda_peak_is_none_without_a_device_and_a_window_with_one():
    if not torch.cuda.is_available():
        assert _memory.cuda_peak_mb() is None and _memory.reset_cuda_peak() is False
        return
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del big
    assert _memory.cuda_peak_mb() >= 64
    assert _memory.reset_cuda_peak() is True
    small = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    assert 1 <= _memory.cuda_peak_mb() < 64  # the window forgot the earlier 64 MiB
    del small


def test_peak_rss_window_resets():
    if not _memory.reset_peak():
        pytest.skip("this platform cannot reset the resident peak")
    block = b"\x01" * (96 * 2**20)  # written, so every page is resident
    high = _memory.peak_rss_mb()
    del block
    _memory.release_free_heap()
    assert _memory.reset_peak()
    assert _memory.peak_rss_mb() < high - 50 and not math.isnan(high)


def test_a_fresh_process_cell_measures_its_own_peak_and_trains_the_same(assets, tmp_path):  # type: ignore[no-untyped-def]
    """``fresh_process``: memory the worker holds (earlier cells' heap; here a written ballast) is not in the cell's
    peak, as it is in a shared process; the cell itself trains to the same metrics either way."""
    from spectune.compare import cells, load_compare_config, run_cell

    if not _memory.reset_peak():
        pytest.skip("this platform cannot reset the resident peak")

    def grid(out: str, fresh: bool):  # type: ignore[no-untyped-def]
        return load_compare_config({
            "base": {"model": {"name": str(assets / "bert"), "max_length": 16},
                     "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}, "eval": {"batch_size": 64}},
            "tasks": {"toy": {"data": {"path": str(assets / "cls.csv")}}}, "methods": {"full": {}},
            "seeds": [0], "output_dir": str(tmp_path / out), "fresh_process": fresh})

    ballast = bytearray(b"\x01" * (400 * 2**20))  # a worker's leftovers: resident, and alive during the cell
    shared = run_cell(grid("shared", False), cells(grid("shared", False))[0])
    fresh = run_cell(grid("fresh", True), cells(grid("fresh", True))[0])
    assert ballast[-1] == 1
    assert shared["status"] == fresh["status"] == "ok"
    assert shared["peak_memory_mb"] > 400 + fresh["peak_memory_mb"] * 0.5
    assert fresh["peak_memory_mb"] < shared["peak_memory_mb"] - 300
    assert fresh["test_accuracy"] == shared["test_accuracy"] and fresh["test_loss"] == shared["test_loss"]
