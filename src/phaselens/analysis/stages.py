"""Developmental stages: training cut at the critical points of the smoothed LLC curve (and of the loss).

A critical point of a curve is where its derivative vanishes: a turning point (a maximum or a
minimum that a move of 10% of the curve's range confirms, as for the geometry phases), a
plateau between two moves (a local minimum of the smoothed |slope| below 10% of its peak, with
the curve moving faster than 30% of the peak on both sides), or the edge of a flat stretch at
the start or the end of training (|slope| below 10% of its peak for three checkpoints or more). The critical points of the LLC and
of the loss together cut the checkpoints into stages; each stage lists the mechanistic
transitions (head scores, copy loss, …) whose step falls inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from phaselens.analysis.phases import FLAT, critical_points, smooth_curve
from phaselens.signals.transitions import series_label

PLATEAU_SLOPE = 0.1  # |slope| under 10% of its peak: the curve rests
MOVING_SLOPE = 0.3  # ... between stretches where it moves at 30% of its peak or more
MIN_REST = 3  # a flat stretch at either end of a curve is a stage when it lasts three checkpoints or more
MIN_GAP = 3  # a loss critical point within three checkpoints of an LLC one is the same boundary
TRANSITIONS_SHOWN = 6


@dataclass(frozen=True)
class Stage:
    index: int
    start: int
    end: int
    llc: tuple[float, float]  # smoothed LLC at start and end
    loss: tuple[float, float] | None  # smoothed loss at start and end (None when no loss was recorded)
    transitions: list[str] = field(default_factory=list)  # "copy ↓ 1132", strongest first
    llc_span: float = 0.0  # range of the smoothed LLC over the whole run

    @property
    def llc_trend(self) -> str:
        """rising or falling; flat when λ̂ moves by less than 5% of its range over the run (as for the geometry phases)."""
        change = self.llc[1] - self.llc[0]
        return "flat" if abs(change) <= FLAT * self.llc_span else ("rising" if change > 0 else "falling")


def plateau_points(steps: np.ndarray, smoothed: np.ndarray) -> list[int]:
    """Indices of the rests of a smoothed curve next to its moves (|slope| of 30% of its peak or more).

    Between two moves: the point of least |slope|, when that is under 10% of the peak slope. Before the
    first move and after the last: where a rest of at least MIN_REST checkpoints (|slope| under 10% of
    the peak all along, from the curve's start or to its end) meets the move, so a flat stretch at
    either end is a stage of its own and not part of the move's.
    """
    if len(smoothed) < 5:
        return []
    slope = np.abs(np.gradient(smoothed, steps.astype(float)))  # (n,)
    peak = float(slope.max())
    if not peak > 0:
        return []
    moving = np.flatnonzero(slope >= MOVING_SLOPE * peak)
    resting = slope < PLATEAU_SLOPE * peak  # (n,)
    points = []
    leading = int(np.argmin(resting))  # resting checkpoints at the start (the peak itself is not resting)
    if leading >= MIN_REST:
        points.append(leading - 1)
    for a, b in zip(moving, moving[1:]):  # consecutive moving points: a rest lies between them if they are apart
        if b - a < 2:
            continue
        i = a + 1 + int(np.argmin(slope[a + 1: b]))
        if slope[i] < PLATEAU_SLOPE * peak:
            points.append(i)
    trailing = int(np.argmin(resting[::-1]))  # resting checkpoints at the end
    if trailing >= MIN_REST:
        points.append(len(slope) - trailing)
    return points


def curve_critical_points(steps: np.ndarray, values: np.ndarray) -> list[int]:
    """Indices of the critical points (turning points and plateaus) of the smoothed curve."""
    smoothed = smooth_curve(np.asarray(values, dtype=float))
    return sorted({*critical_points(smoothed), *plateau_points(np.asarray(steps), smoothed)})


def _merge(primary: list[int], secondary: list[int]) -> list[int]:
    """The LLC's critical points, and the loss's that are at least MIN_GAP checkpoints from every kept point."""
    kept = sorted(set(primary))
    for p in sorted(secondary):
        if all(abs(p - k) >= MIN_GAP for k in kept):
            kept = sorted(kept + [p])
    return kept


def developmental_stages(llc: pd.Series, loss: pd.Series | None = None, transitions: pd.DataFrame | None = None
                         ) -> tuple[list[Stage], dict[str, list[int]]]:
    """Stages between the critical points of the LLC (and loss) curves, and those points as steps per curve.

    llc, loss: values indexed by checkpoint step (the loss is read at the LLC's steps where it has them).
    transitions: a `detect_transitions` frame; each stage lists those whose step lies in it.
    """
    llc = llc.dropna().sort_index()
    steps = llc.index.to_numpy()
    if len(steps) < 2:
        return [], {"llc": [], "loss": []}
    points = {"llc": curve_critical_points(steps, llc.to_numpy())}
    loss_curve = None
    if loss is not None and len(loss.dropna()):
        aligned = loss.dropna().sort_index()
        aligned = aligned[~aligned.index.duplicated()]
        # a dense (live) loss: its mean over the points around each checkpoint, read at the checkpoints
        loss_gap = float(np.median(np.diff(aligned.index.to_numpy()))) if len(aligned) > 1 else 1.0
        per_checkpoint = max(1, int(float(np.median(np.diff(steps))) / max(loss_gap, 1.0)))
        aligned = aligned.rolling(per_checkpoint, center=True, min_periods=1).mean().reindex(steps, method="nearest")
        loss_curve = smooth_curve(aligned.to_numpy())
        points["loss"] = curve_critical_points(steps, aligned.to_numpy())
    else:
        points["loss"] = []
    cuts = [0, *_merge(points["llc"], points["loss"])]
    cuts = [c for c in cuts if c < len(steps) - 1] + [len(steps) - 1]
    llc_curve = smooth_curve(llc.to_numpy())
    stages = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:]), 1):
        lo, hi = int(steps[a]), int(steps[b])
        inside = _inside(transitions, lo, hi, last=b == len(steps) - 1)
        stages.append(Stage(i, lo, hi, (float(llc_curve[a]), float(llc_curve[b])),
                            None if loss_curve is None else (float(loss_curve[a]), float(loss_curve[b])), inside,
                            float(np.ptp(llc_curve))))
    return stages, {name: [int(steps[i]) for i in idx] for name, idx in points.items()}


def _inside(transitions: pd.DataFrame | None, start: int, end: int, last: bool) -> list[str]:
    """The strongest transitions (head scores and losses first) with start <= step < end (<= end for the last stage)."""
    if transitions is None or transitions.empty:
        return []
    upper = transitions["step"] <= end if last else transitions["step"] < end
    rows = transitions[(transitions["step"] >= start) & upper & transitions["probe"].isin(("heads", "loss"))]
    rows = rows.sort_values("strength", ascending=False).drop_duplicates(["probe", "metric", "layer", "head"])
    return [f"{series_label(r)}{' loss' if r['probe'] == 'loss' else ''} {'↑' if r['after'] > r['before'] else '↓'} "
            f"{r['before']:.2f} → {r['after']:.2f} at {int(r['step'])}" for _, r in rows.head(TRANSITIONS_SHOWN).iterrows()]


def llc_curve(metrics: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The whole model's λ̂ and its standard error over chains (`llc_se`; `llc_std` for runs measured before it),
    indexed by checkpoint step, from a run's metrics rows (the per-head rows of `components=heads` left out)."""
    rows = metrics[(metrics["probe"] == "llc") & (metrics["source"] == "checkpoint") & metrics["layer"].isna()
                   & metrics["head"].isna()]
    series = {m: rows[rows["metric"] == m].groupby("step")["value"].mean().sort_index() for m in ("llc", "llc_se", "llc_std")}
    return series["llc"], series["llc_se"] if len(series["llc_se"]) else series["llc_std"]


def head_llc_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """The weight-refined λ̂ of every head over checkpoints: steps × "L{l}H{h}" columns (empty without components=heads)."""
    rows = metrics[(metrics["probe"] == "llc") & (metrics["source"] == "checkpoint") & (metrics["metric"] == "llc")
                   & metrics["head"].notna()]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(name=[f"L{int(l)}H{int(h)}" for l, h in zip(rows["layer"], rows["head"])])
    return rows.pivot_table(index="step", columns="name", values="value").sort_index()


def stage_loss(metrics: pd.DataFrame) -> pd.Series | None:
    """The loss the stages are also cut on: the training loss (live), else the probe-batch loss at checkpoints."""
    for source, metric in (("live", "train"), ("checkpoint", "all")):
        rows = metrics[(metrics["probe"] == "loss") & (metrics["metric"] == metric) & (metrics["source"] == source)]
        if len(rows):
            return rows.groupby("step")["value"].mean().sort_index()
    return None


def run_stages(metrics: pd.DataFrame, transitions: pd.DataFrame) -> tuple[list[Stage], dict[str, list[int]]]:
    """A run's developmental stages from its metrics rows and detected transitions (none before the `llc` probe ran)."""
    llc, _ = llc_curve(metrics)
    if llc.empty:
        return [], {"llc": [], "loss": []}
    return developmental_stages(llc, stage_loss(metrics), transitions)
