"""A study is one YAML file: a comparison grid (as in ``spectune compare``) plus the study's own knobs.

Validated by pydantic with unknown keys refused, so a mistyped key is an error that
names its dotted path instead of a silently ignored setting. The grid is the same
``base <- task <- method <- seed`` merge the comparison runner uses; the study adds
the settings every one of its cells needs (spectral tracking every N steps, the
final weights kept) on top of each method, so all studies of one config share the
same cells and a second study reuses the first one's runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spectune.analyze.naming import MODULE_TYPES
from spectune.compare.config import CompareConfig, load_compare_config, merge
from spectune._config import load_model
from spectune.train.config import TrainConfigError

TRACKED = ["stable_rank", "top_eig_ratio", "alpha_hill", "spectral_norm"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridSection(_Section):
    """The comparison grid (``spectune compare``'s fields, without its name and output folder)."""

    base: dict[str, Any] = Field(default_factory=dict)
    tasks: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    baseline: str | None = None
    metric: Literal["auto", "accuracy", "macro_f1", "loss", "perplexity"] = "auto"


class ControlledSection(_Section):
    """Which matrices get their eigenvalue ratio changed, how much, and how they are then tuned."""

    method: str | None = Field(None, description="the grid method that fine-tunes every dose (default: the first)")
    arms: dict[str, list[str]] = Field(
        default_factory=lambda: {"attention": ["attn_q", "attn_k", "attn_v", "attn_o"], "ffn": ["ffn_up", "ffn_down"]},
        description="arm name -> module types whose matrices are transformed together",
    )
    layers: list[int] | None = Field(None, description="block indices to transform (default: every block)")
    top_k: int = Field(1, ge=1, description="how many top singular values are rescaled")
    doses: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=2,
                               description="factors on the top-k singular values; 1.0 is the unmodified control")
    seeds: list[int] | None = Field(None, description="default: the grid's seeds")

    @field_validator("doses")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(d <= 0 for d in v) or len(set(v)) != len(v):
            raise ValueError("doses must be distinct and > 0")
        return sorted(v)

    @field_validator("arms")
    @classmethod
    def _types(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        from spectune.compare.config import NAME_RULE

        for arm, types in v.items():
            if not NAME_RULE.match(arm) or arm == "control":  # it names a model folder: nothing may escape the study
                raise ValueError(f"arm name {arm!r}: use letters, digits, '.', '_' or '-', not starting with '.', "
                                 "and not 'control' (the shared dose-1 arm)")
            bad = [t for t in types if t not in MODULE_TYPES]
            if bad or not types:
                raise ValueError(f"arm {arm!r}: unknown module types {bad}; known: {', '.join(MODULE_TYPES)}")
        return v


class LandscapeSection(_Section):
    """Fixed batch set and the sizes of the two smoothness measures."""

    batches: int = Field(4, ge=1)
    batch_size: int = Field(16, ge=1)
    split: Literal["train", "validation", "test"] = "train"
    rel_size: float = Field(0.01, gt=0, description="perturbation size relative to each matrix's Frobenius norm")
    draws: int = Field(5, ge=1)
    power_iters: int = Field(20, ge=1)
    tol: float = Field(1e-3, gt=0)
    params: Literal["blocks", "all_matrices"] = Field(
        "blocks", description="blocks: the transformer blocks' matrices (and the head); all_matrices: embeddings too"
    )


class ClaimsSection(_Section):
    confidence: float = Field(0.95, gt=0.5, lt=1)
    gap: Literal["gap_loss", "gap_accuracy", "gap_macro_f1"] = Field(
        "gap_loss", description="the generalization gap the claims use (test minus train loss by default)"
    )
    early_fraction: float = Field(0.33, gt=0, lt=1, description="what 'early training' means, as a share of the steps")


class StudyConfig(_Section):
    name: str = "study"
    output_dir: str = "runs/study"
    grid: GridSection
    track_every_steps: int = Field(10, ge=1, description="spectral tracking every N optimizer steps")
    track_metrics: list[str] = Field(default_factory=lambda: list(TRACKED))
    controlled: ControlledSection = Field(default_factory=ControlledSection)
    landscape: LandscapeSection = Field(default_factory=LandscapeSection)
    claims: ClaimsSection = Field(default_factory=ClaimsSection)

    def cell_settings(self) -> dict[str, Any]:
        """What every study cell needs, laid over each method: tracking every N steps and the final weights."""
        metrics = list(dict.fromkeys([*TRACKED, *self.track_metrics]))
        return {"logging": {"track_spectra_every_steps": self.track_every_steps, "track_metrics": metrics},
                "output": {"save_final": True}}

    def compare_config(self, output_dir: str | Path, methods: dict[str, dict[str, Any]] | None = None,
                       seeds: list[int] | None = None) -> CompareConfig:
        """The grid as a validated ``CompareConfig`` writing its cells under ``output_dir``."""
        g = self.grid
        chosen = methods if methods is not None else g.methods
        data = {
            "name": self.name, "base": g.base, "tasks": g.tasks,
            "methods": {m: merge(frag, self.cell_settings()) for m, frag in chosen.items()},
            "seeds": seeds or g.seeds, "metric": g.metric, "output_dir": str(output_dir),
            "baseline": g.baseline if methods is None else None,
        }
        return load_compare_config(data)


def load_study_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> StudyConfig:
    """Read, override (``key.path=value``) and validate a study config; the grid's cells are validated too."""
    cfg = load_model(StudyConfig, source, overrides, what="study config")
    where = str(source) if not isinstance(source, dict) else "study config"
    if cfg.controlled.method is not None and cfg.controlled.method not in cfg.grid.methods:
        raise TrainConfigError(f"{where}: controlled.method {cfg.controlled.method!r} is not a grid method: "
                               f"{', '.join(cfg.grid.methods)}")
    try:
        cfg.compare_config(Path(cfg.output_dir) / "grid")
    except TrainConfigError as err:
        raise TrainConfigError(f"{where}: grid: {err}") from None
    return cfg
