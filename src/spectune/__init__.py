"""spectune: spectral-guided fine-tuning of transformer language models.

The pipeline reads top to bottom: ``analyze`` (weight spectra) -> ``plan``
(per-layer decisions) -> ``train`` (apply a plan) -> ``compare`` (evidence).
"""

from spectune.analyze import AnalysisConfig, AnalysisResult, analyze

__version__ = "0.1.0"
__all__ = ["AnalysisConfig", "AnalysisResult", "__version__", "analyze"]
