"""Phases of residual-stream geometry: training split at the critical points of the IE and KL curves.

Each curve is smoothed (a centred rolling mean over checkpoints, so log-spaced series such as
Pythia's are treated point by point), and its critical points are the turning points of the
smoothed curve that reverse a move of at least `tolerance` of the curve's range (a zigzag
filter: wiggles smaller than that are noise, not phases). The critical points of both curves
together cut the steps into phases; each phase says which way KL and IE went in it.

Every phase passes two floors, or its boundary is dropped and it joins a neighbour:

* it spans at least `MIN_PHASE_CHECKPOINTS` (3) checkpoints, its two ends included (a phase between
  two adjacent checkpoints is one difference, not a phase; so 5 checkpoints make at most two phases);
* its effect size, the larger of |ΔKL| / range(KL) and |ΔIE| / range(IE) across it on the smoothed
  curves, is at least `MIN_PHASE_EFFECT` (10%): a stretch where neither curve moves by a tenth of
  its range is not a phase of its own.

The weakest phase below a floor goes first; it merges across the boundary it shares with its weaker
neighbour. A series whose only phase is below the effect floor has no phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

TOLERANCE = 0.1  # a turn counts when the curve moves back by 10% of its range
FLAT = 0.05  # a phase in which a curve moves by less than 5% of its range leaves it flat
MIN_PHASE_CHECKPOINTS = 3  # a phase spans at least 3 checkpoints, its ends included
MIN_PHASE_EFFECT = 0.1  # a phase moves KL or IE by at least 10% of that curve's range


@dataclass(frozen=True)
class Phase:
    start: int
    end: int
    kl: str  # "rising", "falling" or "flat"
    ie: str
    kl_values: tuple[float, float]  # smoothed KL at start and end
    ie_values: tuple[float, float]
    effect: float = float("nan")  # max(|ΔKL| / range(KL), |ΔIE| / range(IE)) across the phase
    checkpoints: int = 0  # checkpoints it spans, its ends included

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


def phase_effect(curves: dict[str, np.ndarray], spans: dict[str, float], a: int, b: int) -> float:
    """A phase's effect size from index a to b: the larger move of its curves, each over that curve's range."""
    return max((abs(float(c[b] - c[a])) / spans[name] if spans[name] > 0 else 0.0) for name, c in curves.items())


def floored_cuts(curves: dict[str, np.ndarray], spans: dict[str, float], cuts: list[int]) -> list[int]:
    """`cuts` (indices, both ends included) with boundaries dropped until every phase passes both floors."""
    cuts = list(cuts)

    def weak(i: int) -> bool:
        a, b = cuts[i], cuts[i + 1]
        return b - a + 1 < MIN_PHASE_CHECKPOINTS or phase_effect(curves, spans, a, b) < MIN_PHASE_EFFECT

    while len(cuts) > 2:
        below = [i for i in range(len(cuts) - 1) if weak(i)]
        if not below:
            break
        i = min(below, key=lambda k: (phase_effect(curves, spans, cuts[k], cuts[k + 1]), cuts[k + 1] - cuts[k]))
        if i == 0:
            drop = 1  # the first phase can only merge forward
        elif i == len(cuts) - 2:
            drop = i  # the last only back
        else:  # merge with the weaker neighbour
            back = phase_effect(curves, spans, cuts[i - 1], cuts[i])
            on = phase_effect(curves, spans, cuts[i + 1], cuts[i + 2])
            drop = i if back <= on else i + 1
        del cuts[drop]
    return cuts


def geometry_phases(steps, ie, kl, tolerance: float = TOLERANCE) -> tuple[list[Phase], dict[str, list[int]]]:
    """Phases between the critical points of the smoothed IE and KL curves that pass the floors (see the module
    docstring), and those points (as steps) per curve: the critical points that bound a phase.

    steps (n,) ascending; ie and kl (n,) values at those steps.
    """
    steps = np.asarray(steps)
    smooth = {"ie": smooth_curve(np.asarray(ie, dtype=float)), "kl": smooth_curve(np.asarray(kl, dtype=float))}
    points = {name: critical_points(curve, tolerance) for name, curve in smooth.items()}
    spans = {name: float(np.nanmax(c) - np.nanmin(c)) if len(c) else 0.0 for name, c in smooth.items()}
    if len(steps) < 2:
        return [], {name: [] for name in points}
    cuts = floored_cuts(smooth, spans, sorted({0, len(steps) - 1, *points["ie"], *points["kl"]}))
    phases = []
    for a, b in zip(cuts, cuts[1:]):
        kl_ab = (float(smooth["kl"][a]), float(smooth["kl"][b]))
        ie_ab = (float(smooth["ie"][a]), float(smooth["ie"][b]))
        effect = phase_effect(smooth, spans, a, b)
        phases.append(Phase(int(steps[a]), int(steps[b]), _trend(kl_ab[1] - kl_ab[0], spans["kl"]),
                            _trend(ie_ab[1] - ie_ab[0], spans["ie"]), kl_ab, ie_ab, effect, b - a + 1))
    if len(phases) == 1 and not (phases[0].effect >= MIN_PHASE_EFFECT and phases[0].checkpoints >= MIN_PHASE_CHECKPOINTS):
        phases = []
    kept = set(cuts[1:-1])
    return phases, {name: [int(steps[i]) for i in idx if i in kept] for name, idx in points.items()}
