"""Compare: methods x tasks x seeds on real models and data, with paired statistics and a report."""

from spectune.compare.config import CompareConfig, cell_config, load_compare_config, merge
from spectune.compare.grid import Cell, cells, run_cell, run_grid

__all__ = ["Cell", "CompareConfig", "cell_config", "cells", "load_compare_config", "merge", "run_cell", "run_grid"]
