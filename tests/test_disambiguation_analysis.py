"""τ, the plateau, the alignment table and the log–log fit, on metric frames written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from phaselens.analysis.disambiguation import alignment, plateau, tau
from phaselens.sweeps.compare import fit_log_log
from phaselens.sweeps.grid import grid_points, parse_grid, point_name
from phaselens.errors import ConfigError

LOG10 = math.log(10)


def frame(metric: str, values, probe: str = "loss", source: str = "live", step: int = 10) -> pd.DataFrame:
    missing = pd.array([pd.NA] * len(values), dtype="Int64")  # per-model values, as the store returns them
    return pd.DataFrame({"step": np.arange(len(values)) * step, "probe": probe, "metric": metric,
                         "layer": missing, "head": missing, "value": values, "source": source})


def lag_curve(drop_at: int = 60, n: int = 100) -> np.ndarray:
    """3.6 → log 10 by point 10, a plateau until `drop_at`, then a sigmoid fall to 0.05 (points 10 steps apart)."""
    i = np.arange(n)
    early = LOG10 + (3.6 - LOG10) * np.exp(-i / 3)
    fall = 1 / (1 + np.exp(-(i - drop_at) / 2))
    return early * (1 - fall) + 0.05 * fall


def test_tau_is_the_first_step_below_half_log_k():
    metrics = frame("first_target", lag_curve())
    expected = int(np.argmax(lag_curve() < 0.5 * LOG10)) * 10
    assert tau(metrics, 10) == pytest.approx(expected, abs=10)  # the rolling median may shift it by one point
    assert tau(frame("first_target", np.full(50, LOG10)), 10) is None
    assert tau(frame("first_target", np.linspace(1, 0, 50)), 1) is None  # K = 1: no log K to halve


def test_plateau_is_the_stretch_within_15_percent_of_log_k_before_tau():
    found = plateau(frame("first_target", lag_curve(drop_at=60)), 10)
    assert found.start <= 100 and 520 <= found.end < 600
    assert found.level == pytest.approx(LOG10, rel=0.02)
    # a steady fall only passes through the band: the time it takes to cross it, not a wait
    assert plateau(frame("first_target", np.linspace(3.6, 0.0, 100)), 10).steps < 0.5 * found.steps


def test_alignment_says_whether_each_diagnostic_moves_inside_the_loss_window():
    loss = frame("first_target", lag_curve(drop_at=60))
    gap_together = frame("z_shuffle_gap", 5 * (1 - lag_curve(drop_at=60) / 3.6))
    z_late = frame("z_dependence", 1 / (1 + np.exp(-(np.arange(100) - 85) / 1.5)), probe="patching", source="checkpoint")
    found = alignment(pd.concat([loss, gap_together, z_late], ignore_index=True), k=10)
    rows = {r["diagnostic"]: r for r in found.rows}
    assert 550 <= rows["first-target loss"]["step"] <= 650
    assert rows["z-shuffle gap"]["overlaps"] is True
    assert rows["z_dependence"]["overlaps"] is False and rows["z_dependence"]["step"] >= 800
    assert found.coincide() is False


def test_log_log_fit_recovers_a_power_law():
    x = np.array([1e-3, 2e-3, 4e-3, 8e-3])
    fit = fit_log_log(x, 3.0 * x ** -1.0, "train.lr")
    assert fit.slope == pytest.approx(-1.0) and fit.r2 == pytest.approx(1.0) and fit.n == 4
    assert fit_log_log(np.array([1e-3, 1e-3]), np.array([100.0, 200.0]), "train.lr") is None
    noisy = fit_log_log(x, 3.0 * x ** -0.5 * np.array([1.2, 0.8, 1.1, 0.9]), "train.lr")
    assert noisy.slope == pytest.approx(-0.5, abs=0.2) and 0 < noisy.r2 < 1


def test_sweep_grid_is_the_cross_product_of_the_axes_with_readable_names():
    axes = parse_grid(["train.lr=1e-3,3e-3", "train.batch_size=32,64"])
    points = grid_points(axes)
    assert points == [{"train.lr": "1e-3", "train.batch_size": "32"}, {"train.lr": "1e-3", "train.batch_size": "64"},
                      {"train.lr": "3e-3", "train.batch_size": "32"}, {"train.lr": "3e-3", "train.batch_size": "64"}]
    assert point_name(points[1]) == "lr=1e-3_batch_size=64"
    linked = grid_points(parse_grid(["data.k,data.n_unique_b=2:500,10:100", "train.lr=1e-3"]))
    assert linked == [{"data.k": "2", "data.n_unique_b": "500", "train.lr": "1e-3"},
                      {"data.k": "10", "data.n_unique_b": "100", "train.lr": "1e-3"}]
    with pytest.raises(ConfigError, match="data.k,data.n_unique_b"):
        parse_grid(["data.k,data.n_unique_b=2:500,10"])
    with pytest.raises(ConfigError, match="train.lr"):
        parse_grid(["train.lr=1e-3", "train.lr=3e-3"])
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["train.lr"])
