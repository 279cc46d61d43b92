"""Analyze: read weight matrices and compute their spectral metrics."""

from spectune.analyze.config import AnalysisConfig
from spectune.analyze.engine import analyze
from spectune.analyze.result import AnalysisResult
from spectune.analyze.sources import SourceError, WeightRef, WeightSource, open_source

__all__ = ["AnalysisConfig", "AnalysisResult", "SourceError", "WeightRef", "WeightSource", "analyze", "open_source"]
