"""spectune: spectral-guided fine-tuning of transformer language models.

The pipeline reads top to bottom: ``analyze`` (weight spectra) -> ``plan``
(per-layer decisions) -> ``train`` (apply a plan) -> ``compare`` (evidence).
"""

__version__ = "0.1.0"

from spectune.analyze import AnalysisConfig, AnalysisResult, analyze  # noqa: E402
from spectune.plan import Plan, param_groups, plan  # noqa: E402

__all__ = ["AnalysisConfig", "AnalysisResult", "Plan", "__version__", "analyze", "param_groups", "plan"]
