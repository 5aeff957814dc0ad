"""Sweeps: train a grid of runs (`phaselens sweep`) and compare their transition steps (`phaselens compare`)."""

from phaselens.sweeps.compare import Comparison, compare_runs
from phaselens.sweeps.grid import grid_points, parse_grid
from phaselens.sweeps.runner import SweepResult, run_sweep

__all__ = ["Comparison", "SweepResult", "compare_runs", "grid_points", "parse_grid", "run_sweep"]
