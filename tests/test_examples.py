"""Every shipped example config is valid as written: its fields, its policy and the policy's parameters.

Running them is a few minutes each (their measured times are in the README); this keeps a
renamed field or policy parameter from leaving an example that fails at its first step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spectune.plan.build import policy_config
from spectune.study.config import load_study_config
from spectune.train.config import load_config

ROOT = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.yaml")), ids=lambda p: p.name)
def test_training_examples_are_valid(path: Path) -> None:
    cfg = load_config(path)
    if cfg.plan is not None and cfg.plan.policy:
        policy_config(cfg.plan.policy, cfg.plan.params)
    assert cfg.output.dir.startswith("runs/"), "examples write under runs/ (gitignored)"


@pytest.mark.parametrize("path", sorted((ROOT / "study").glob("*.yaml")), ids=lambda p: p.name)
def test_study_examples_are_valid(path: Path) -> None:
    assert load_study_config(path).name


def test_every_published_variant_has_an_example() -> None:
    """Issue 14's variants and issue 10's training paths each ship a runnable example."""
    texts = "\n".join(p.read_text() for p in ROOT.glob("*.yaml"))
    for needle in ("granularity: block", "alpha_estimator: farms", "policy: alpha-decay", "policy: by-type",
                   "init: pissa", "kind: qlora", "format: chat", "dtype: bfloat16", "objective: dpo",
                   "distributed: fsdp"):
        assert needle in texts, needle
    compare = "\n".join(p.read_text() for p in (ROOT / "compare").glob("*.yaml"))
    assert "match_params_of" in compare
