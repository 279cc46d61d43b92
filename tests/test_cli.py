"""The command line end to end on a tiny model folder: outputs exist, are whole, errors are clear."""

from __future__ import annotations

import json

import pandas as pd
import yaml
from typer.testing import CliRunner

from spectune.cli import app

runner = CliRunner()


def test_analyze_then_plan_from_saved_analysis(tiny_folder, tmp_path):  # type: ignore[no-untyped-def]
    _, folder = tiny_folder("llama")
    out = tmp_path / "analysis"
    res = runner.invoke(app, ["analyze", str(folder), "--out", str(out), "--esd", "none", "--randomize"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "metrics.parquet")
    assert len(df) == len(pd.read_csv(out / "metrics.csv"))
    assert df["rand_distance"].notna().any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["n_matrices"] == len(df)
    assert (out / "report.html").exists()
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind
    assert "mean metrics by module type" in res.output

    plan_path = tmp_path / "plan.yaml"
    res = runner.invoke(
        app, ["plan", "--from-analysis", str(out), "--policy", "phased", "--set", "phase=ce", "--out", str(plan_path)]
    )
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(plan_path.read_text())
    assert data["policy"] == "phased" and data["params"]["phase"] == "ce"
    assert data["analysis_digest"] == summary["model"]["digest"]
    page = (tmp_path / "plan.html").read_text()
    assert "Per-matrix decisions" in page and "model.layers.0.self_attn.q_proj.weight" in page
    assert 'src="data:image/png;base64,' in page  # lr_scale by depth

    peft_path = tmp_path / "lora.json"
    res = runner.invoke(
        app, ["plan", "--from-analysis", str(out), "--policy", "adaptive-rank", "--format", "peft", "--out", str(peft_path)]
    )
    assert res.exit_code == 0, res.output
    kw = json.loads(peft_path.read_text())
    assert all(k.startswith("^") and k.endswith("$") for k in kw["rank_pattern"])


def test_cli_errors_are_messages_not_tracebacks(tmp_path):  # type: ignore[no-untyped-def]
    res = runner.invoke(app, ["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "model not found" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["analyze", "minilm", "--dtype", "float16", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "dtype" in res.output
    res = runner.invoke(app, ["plan", "--from-analysis", str(tmp_path), "--policy", "phased"])
    assert res.exit_code == 2 and "no saved analysis" in res.output
