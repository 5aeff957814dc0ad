"""The level at either end of a series: the median of its first or last 5% (one noisy step does not decide)."""

from __future__ import annotations

import numpy as np
import pandas as pd

EDGE_SHARE = 20  # an end of a series is its first or last 1/20 = 5% of points (at least one)


def _finite(values: pd.Series | np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)  # (n,)
    return values[np.isfinite(values)]


def _edge(n: int) -> int:
    return max(1, n // EDGE_SHARE)


def final_level(values: pd.Series | np.ndarray) -> float:
    """The level a series ends at: the median of its last 5% of finite values (NaN when it has none).

    Args:
        values: the series in step order, shape (n,).
    """
    values = _finite(values)
    return float(np.median(values[-_edge(len(values)):])) if len(values) else float("nan")


def initial_level(values: pd.Series | np.ndarray) -> float:
    """The level a series starts at: the median of its first 5% of finite values (NaN when it has none)."""
    values = _finite(values)
    return float(np.median(values[:_edge(len(values))])) if len(values) else float("nan")
