"""Configs written before the method registry read back as the same run.

tests/fixtures/configs-before-registry/ holds config.yaml files as spectune wrote them at
commit 3a417d3 (one flat ``method`` section carrying every kind's fields), for examples and
for a comparison cell. Read back (``stored_config_yaml``, which a resume and a comparison's
reuse check both use), each must equal what today's version makes of the same source, so a
finished cell is reused and a run resumes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spectune.compare.config import cell_config, load_compare_config
from spectune.train import TrainConfigError, load_config
from spectune.train.config import stored_config_yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs-before-registry"
CELL = "compare-cell-minilm-three-tasks-trec-stable-rank-switch.yaml"


def _today(name: str) -> str:
    if name == CELL:
        cfg = load_compare_config(ROOT / "experiments" / "minilm-three-tasks.yaml")
        return cell_config(cfg, "trec", "stable-rank-switch", 0).to_yaml()
    return load_config(ROOT / "examples" / name).to_yaml()


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.yaml")))
def test_a_config_written_before_the_registry_reads_back_as_the_same_run(name: str) -> None:
    old = (FIXTURES / name).read_text()
    assert yaml.safe_load(old)["method"].get("num_virtual_tokens") == 16  # really the flat, every-kind section
    assert stored_config_yaml(old) == _today(name)


def test_the_flat_section_is_refused_when_written_by_hand() -> None:
    """Only stored configs are read leniently; a user's own config with another kind's key is an error."""
    flat = yaml.safe_load((FIXTURES / "minilm-trec-alpha-balance.yaml").read_text())
    with pytest.raises(TrainConfigError, match=r"method\.r is a setting of kind lora"):
        load_config(flat)
