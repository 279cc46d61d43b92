"""Records that are never wrong about what produced them (issue 12): odd names, resumed logs, caches, partial saves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from spectune.cli import app
from tests.conftest import tiny_model

runner = CliRunner()


def _analysis_dir(tmp_path: Path) -> Path:
    import spectune

    out = tmp_path / "analysis"
    spectune.analyze(tiny_model("bert"), progress=False).save(out)
    return out


def test_markup_like_paths_and_errors_are_printed_literally(tmp_path):  # type: ignore[no-untyped-def]
    for odd in ("x[/x]", "a[bold]b"):
        res = runner.invoke(app, ["train", str(tmp_path / odd / "missing.yaml")])
        assert res.exit_code == 2, res.output
        assert isinstance(res.exception, SystemExit)  # no MarkupError traceback
        assert odd in res.output.replace("\n", "")  # '[bold]' is not swallowed as a style


def test_a_failing_cell_with_markup_in_its_error_does_not_end_the_grid(assets, tmp_path):  # type: ignore[no-untyped-def]
    from spectune.compare import load_compare_config, run_grid

    cfg = load_compare_config({
        "name": "odd", "base": {"model": {"name": str(assets / "bert"), "max_length": 16},
                                "train": {"epochs": 1, "batch_size": 16}},
        "tasks": {"toy": {"data": {"path": str(assets / "cls.csv")}}},
        "methods": {"full": {}, "broken": {"plan": {"file": str(tmp_path / "[/x]" / "plan.yaml")}}},
        "seeds": [0], "output_dir": str(tmp_path / "grid")})
    df = run_grid(cfg, progress=True)  # the bar prints the failure: a '[/x]' in it must not raise MarkupError
    assert set(df["status"]) == {"ok", "failed"} and df.loc[df["method"] == "broken", "error"].str.contains(r"\[/x\]").all()


def test_plan_refuses_an_output_that_the_report_would_overwrite(tmp_path):  # type: ignore[no-untyped-def]
    src = _analysis_dir(tmp_path)
    res = runner.invoke(app, ["plan", "--from-analysis", str(src), "--out", str(tmp_path / "plan.html")])
    assert res.exit_code != 0 and "another suffix" in res.output.replace("\n", " ")
    assert not (tmp_path / "plan.html").exists()
    ok = runner.invoke(app, ["plan", "--from-analysis", str(src), "--out", str(tmp_path / "plan.yaml")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "plan.yaml").read_text().startswith("format_version") and (tmp_path / "plan.html").exists()


def test_a_resumed_run_logs_each_step_once(assets, tmp_path):  # type: ignore[no-untyped-def]
    from tests.test_train import Crash, _cfg
    from spectune.train.run import run

    over = dict(plan={"policy": "phased"}, output={"save_every": "steps", "save_every_steps": 3},
                train={"epochs": 2}, logging={"every_steps": 1, "tensorboard": False, "progress": False,
                                              "track_spectra_every_steps": 2})
    run(_cfg(assets, tmp_path / "ref", **over))
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(assets, tmp_path / "cut", **over), extra_callbacks=[Crash(at=11)])  # logged 10 and 11 past checkpoint 9
    run(_cfg(assets, tmp_path / "cut", **over), resume=True)

    def logged(d: Path) -> list[tuple]:  # type: ignore[type-arg]
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return sorted((r["step"], r.get("kind", ""), "loss" in r) for r in rows)

    assert logged(tmp_path / "cut") == logged(tmp_path / "ref")
    a, b = (pd.read_parquet(d / "spectral_trajectory.parquet") for d in (tmp_path / "ref", tmp_path / "cut"))
    assert sorted(b["step"].unique()) == sorted(a["step"].unique()) and len(a) == len(b)
    assert not b.duplicated(["step", "name"]).any()


def test_a_failed_tokenizer_conversion_is_an_error_and_caches_nothing(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import transformers

    from spectune.analyze import builtin

    monkeypatch.setenv("SPECTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama"))

    def broken(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError("no tokenizer in this GGUF")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(builtin.AliasUnavailable, match="converting the tokenizer .* failed .*no tokenizer in this GGUF"):
        builtin.converted_smollm2(tmp_path / "model.gguf")
    assert not (tmp_path / "cache" / "smollm2-135m").exists()
    # a folder left by an older spectune (weights, no marker) is not taken for a whole cache
    old = tmp_path / "cache" / "smollm2-135m"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"x")
    (old / "config.json").write_text("{}")
    with pytest.raises(builtin.AliasUnavailable):
        builtin.converted_smollm2(tmp_path / "model.gguf")


def test_a_tensorboard_failure_is_a_warning(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import torch.utils.tensorboard as tb

    from spectune.train.callbacks import SpectralTracker

    def broken(*a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError("read-only folder")

    monkeypatch.setattr(tb, "SummaryWriter", broken)
    tracker = SpectralTracker(tmp_path, ["stable_rank"], 0, {})
    with pytest.warns(UserWarning, match="no TensorBoard events .*read-only folder"):
        tracker._open(0)


class _Named(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module("price$in$dollars", torch.nn.Linear(40, 60))
        self.add_module("odd$", torch.nn.Linear(60, 40))


def test_a_dollar_in_a_tensor_name_is_printed_literally(tmp_path):  # type: ignore[no-untyped-def]
    import spectune
    from spectune.analyze.report import write_report

    result = spectune.analyze(_Named(), progress=False)
    path = write_report(result, tmp_path, esd="all")
    assert "price$in$dollars.weight" in path.read_text() and "odd$.weight" in path.read_text()


def test_an_interrupted_analysis_save_is_refused_on_load(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import spectune
    from spectune.analyze.result import AnalysisResult

    result = spectune.analyze(tiny_model("bert"), progress=False)
    result.save(tmp_path)
    assert len(AnalysisResult.load(tmp_path).metrics) == len(result.metrics)

    def killed(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed while writing spectra.npz")

    monkeypatch.setattr(np, "savez_compressed", killed)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path)  # metrics were replaced, spectra were not: the set is mixed
    with pytest.raises(FileNotFoundError, match="incomplete analysis"):
        AnalysisResult.load(tmp_path)


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import os

    from spectune import _io

    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    _io.write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello" and len(synced) == 2  # the file, then its folder


def test_results_markdown_prints_the_name_and_command_literally(tmp_path):  # type: ignore[no-untyped-def]
    from spectune.compare.markdown import md_code, md_escape

    assert md_escape("a_b *c* [d](e) <f> #g |h") == "a\\_b \\*c\\* \\[d\\](e) \\<f\\> \\#g \\|h"
    assert md_code("spectune compare x.yaml") == "`spectune compare x.yaml`"
    assert md_code("a `b` c") == "``a `b` c``"
