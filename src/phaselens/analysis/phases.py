"""Phases of residual-stream geometry: training split at the critical points of the IE and KL curves.

Each curve is smoothed (a centred rolling mean over checkpoints, so log-spaced series such as
Pythia's are treated point by point), and its critical points are the turning points of the
smoothed curve that reverse a move of at least `tolerance` of the curve's range (a zigzag
filter: wiggles smaller than that are noise, not phases). The critical points of both curves
together cut the steps into phases; each phase says which way KL and IE went in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

TOLERANCE = 0.1  # a turn counts when the curve moves back by 10% of its range
FLAT = 0.05  # a phase in which a curve moves by less than 5% of its range leaves it flat


@dataclass(frozen=True)
class Phase:
    start: int
    end: int
    kl: str  # "rising", "falling" or "flat"
    ie: str
    kl_values: tuple[float, float]  # smoothed KL at start and end
    ie_values: tuple[float, float]

    def description(self) -> str:
        verbs = {"rising": "rises", "falling": "falls", "flat": "stays flat"}
        if self.kl == self.ie:
            return f"KL and IE both {self.kl}" if self.kl != "flat" else "KL and IE flat"
        return f"KL {self.kl} while IE {verbs[self.ie]}"


def smooth_curve(values: np.ndarray) -> np.ndarray:
    """Centred rolling mean over about a tenth of the points (none for fewer than 10)."""
    window = max(1, (len(values) // 10) | 1)
    return pd.Series(values, dtype=float).rolling(window, center=True, min_periods=1).mean().to_numpy()


def critical_points(values: np.ndarray, tolerance: float = TOLERANCE) -> list[int]:
    """Indices of the turning points (maxima and minima) of `values` that a move of `tolerance`·range confirms."""
    values = np.asarray(values, dtype=float)
    span = float(np.nanmax(values) - np.nanmin(values)) if len(values) else 0.0
    if len(values) < 3 or not span > 0:
        return []
    threshold = tolerance * span
    points: list[int] = []
    direction, extreme = 0, 0
    for i in range(1, len(values)):
        if direction == 0:
            if abs(values[i] - values[0]) >= threshold:
                direction, extreme = (1 if values[i] > values[0] else -1), i
        elif direction * (values[i] - values[extreme]) > 0:  # further the same way
            extreme = i
        elif direction * (values[extreme] - values[i]) >= threshold:  # turned back far enough
            points.append(extreme)
            direction, extreme = -direction, i
    return points


def _trend(change: float, span: float) -> str:
    if not span > 0 or abs(change) < FLAT * span:
        return "flat"
    return "rising" if change > 0 else "falling"


def geometry_phases(steps, ie, kl, tolerance: float = TOLERANCE) -> tuple[list[Phase], dict[str, list[int]]]:
    """Phases between the critical points of the smoothed IE and KL curves, and those points (as steps) per curve.

    steps (n,) ascending; ie and kl (n,) values at those steps.
    """
    steps = np.asarray(steps)
    smooth = {"ie": smooth_curve(np.asarray(ie, dtype=float)), "kl": smooth_curve(np.asarray(kl, dtype=float))}
    points = {name: critical_points(curve, tolerance) for name, curve in smooth.items()}
    cuts = sorted({0, len(steps) - 1, *points["ie"], *points["kl"]})
    spans = {name: float(np.nanmax(c) - np.nanmin(c)) if len(c) else 0.0 for name, c in smooth.items()}
    phases = []
    for a, b in zip(cuts, cuts[1:]):
        kl_ab = (float(smooth["kl"][a]), float(smooth["kl"][b]))
        ie_ab = (float(smooth["ie"][a]), float(smooth["ie"][b]))
        phases.append(Phase(int(steps[a]), int(steps[b]), _trend(kl_ab[1] - kl_ab[0], spans["kl"]),
                            _trend(ie_ab[1] - ie_ab[0], spans["ie"]), kl_ab, ie_ab))
    return phases, {name: [int(steps[i]) for i in idx] for name, idx in points.items()}
