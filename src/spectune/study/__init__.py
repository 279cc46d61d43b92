"""Seed 001's studies: spectral trajectories, controlled eigenvalue ratios, layer-wise movement, landscape.

``run_study(name, config)`` runs one of ``STUDIES`` (or ``all``) and returns its report
path; see docs/studies.md for what each computes and how claims are decided.
"""

from spectune.study.config import StudyConfig, load_study_config
from spectune.study.runner import STUDIES, run_study

__all__ = ["STUDIES", "StudyConfig", "load_study_config", "run_study"]
