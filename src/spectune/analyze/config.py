"""Options of one analysis run, validated (a typo in a key is an error, not a silent default)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AnalysisConfig(BaseModel):
    """How ``spectune.analyze`` reads and measures a model. Defaults suit a CPU laptop."""

    model_config = ConfigDict(extra="forbid")

    include: list[str] = Field(default_factory=list, description="analyze only names matching any regex")
    exclude: list[str] = Field(default_factory=list, description="skip names matching any regex")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float64", "float32"] = Field("float64", description="precision of the spectrum computation")
    method: Literal["gram", "svd"] = Field("gram", description="eigvalsh of the Gram matrix, or svdvals")
    min_evals: int = Field(10, ge=1, description="fewer eigenvalues than this: status too_small, no fits")
    tw_margin: bool = Field(
        True, description="count spikes above the MP edge plus a Tracy-Widom margin (default: without it a pure-noise "
        "matrix shows a spike in 7-27% of draws; with it the false-spike rate stays under 5%)")
    alpha_estimator: Literal["hill", "farms"] = Field(
        "hill",
        description="spectrum the alpha fits read: hill = the matrix's own; farms = pooled fixed-aspect-ratio "
        "windows (Hu et al., ICML 2025), which compares matrices of different shapes on one MP shape",
    )
    farms_window: int = Field(2000, ge=2, description="farms: window short side, capped at the matrix's short side")
    farms_aspect: float = Field(1.0, ge=1, description="farms: window long side / short side (1 = square)")
    farms_windows_per_dim: int = Field(10, ge=1, description="farms: window offsets along each dimension")
    uncertainty: str = Field(
        "asymptotic",
        description="interval of every alpha: asymptotic ((alpha - 1) / sqrt(n_tail), the default) or bootstrap[:B] "
        "(B >= 20 resamples of the eigenvalues, 200 if B is not given; about 12x the analysis time)",
    )
    randomize: bool = Field(False, description="also compute rand_distance (one more spectrum per matrix)")
    ce_mode: Literal["histogram", "elementwise"] = "histogram"
    ce_bins: int = Field(256, ge=8)
    batch_bytes: int = Field(128 * 2**20, ge=2**20, description="bytes of weights loaded at once")
    seed: int = Field(0, description="seed of the shuffles behind rand_distance and of the bootstrap resamples")
    trust_remote_code: bool = False
    progress: bool = True

    @field_validator("uncertainty")
    @classmethod
    def _uncertainty(cls, v: str) -> str:
        from spectune.analyze.tailfit import Uncertainty

        return Uncertainty.parse(v).label  # 'bootstrap' becomes 'bootstrap:200': the table says how many
