"""Change-point analysis: find the phase transitions in every metric series.

A transition is a sustained move of a series from one level to another. For each series we
smooth it (rolling median, then mean), take the step of steepest change, extend outwards
while the slope stays above 30% of that peak slope (so a plateau ends it), and read the
levels before and after. It is reported when

* the change is large against the noise: |after − before| > 3σ and > 10σ/√w, with σ the
  robust (MAD) spread of the raw values around the smooth curve and w the smoothing window;
* it is a transition, not a drift: the 10%–90% window spans at most 40% of the series, and just
  before the climb begins and just after it levels off the curve moves at less than half the rate
  it moves inside the window.

The window is read off the smooth curve between where the climb begins and where it levels
off, and the reported step is the steepest point inside that window, so start ≤ step ≤ end.

Each side of a found transition is searched again, so a bump (up, then down) gives two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from phaselens.signals.sources import Prefer, prefer_source

COLUMNS = ["probe", "metric", "layer", "head", "step", "start", "end", "before", "after", "strength", "source"]
MIN_POINTS = 12
MAX_PER_SERIES = 4
MAX_WINDOW_FRACTION = 0.4
CLIMB = 0.3  # a transition's climb begins and ends where the smooth slope falls under 30% of its peak
DRIFT_RATE = 0.5  # a move is a drift when next to its window the curve moves at half its rate or more


@dataclass(frozen=True)
class Transition:
    step: int  # steepest change
    start: int  # 10% of the change reached
    end: int  # 90% of the change reached
    before: float
    after: float
    strength: float  # |after − before| in units of the point noise σ


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Rolling median (robust to spikes) then rolling mean, centred."""
    series = pd.Series(values)
    med = series.rolling(window, center=True, min_periods=1).median()
    return med.rolling(window, center=True, min_periods=1).mean().to_numpy()


def _window(smoothed: np.ndarray, a: int, b: int, direction: float) -> tuple[int, int]:
    """Indices where the smooth curve has covered 10% and 90% of its move from index a to index b."""
    move = direction * (smoothed[a: b + 1] - smoothed[a])  # (b − a + 1,), rising to the total move
    total = move[-1]
    if not total > 0:
        return a, b
    i10 = a + int(np.argmax(move >= 0.1 * total))
    i90 = a + int(np.argmax(move >= 0.9 * total))
    return i10, max(i10, i90)


def _drift(steps: np.ndarray, smoothed: np.ndarray, i10: int, i90: int, a: int, b: int, direction: float,
           window: int) -> bool:
    """True when, next to its climb, the curve moves the same way at half its rate or more: a slow drift.

    Compares the mean rate inside the 10–90% window with the rate, in the same direction, over a
    stretch as long as the window just before the climb begins (a) and just after it levels off (b).
    The stretches start at the climb's ends, not at the 10% and 90% points, because smoothing
    spreads a sharp rise past those points and would make it look like its own drift. A move the
    other way (a bump going back) does not count, and a stretch shorter than the smoothing window
    is not judged.
    """
    def rate(i: int, j: int) -> float:
        return direction * (smoothed[j] - smoothed[i]) / max(1, steps[j] - steps[i])

    inside = rate(i10, i90)
    width = max(i90 - i10, window)
    stretches = ((max(0, a - width), a), (b, min(len(steps) - 1, b + width)))
    return any(rate(i, j) >= DRIFT_RATE * inside for i, j in stretches if j - i >= window)


def find_transitions(steps: np.ndarray, values: np.ndarray) -> list[Transition]:
    """Transitions of one series (steps ascending), earliest first."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    n = len(values)
    if n < MIN_POINTS:
        return []
    window = max(3, (n // 40) | 1)
    smoothed = smooth(values, window)
    sigma = 1.4826 * float(np.median(np.abs(values - smoothed)))
    scale = max(1e-12, 1e-9 * float(np.max(np.abs(values))))
    threshold = max(3 * sigma, 10 * sigma / np.sqrt(window), scale)
    span = float(steps[-1] - steps[0]) or 1.0
    rate = np.gradient(smoothed)  # change per point of the smooth curve
    found: list[Transition] = []

    def search(lo: int, hi: int) -> None:
        if hi - lo < 2 * window + 2 or len(found) >= MAX_PER_SERIES:
            return
        seg = smoothed[lo:hi]
        h = max(1, window // 2)
        diff = seg[2 * h:] - seg[: -2 * h]
        if len(diff) == 0:
            return
        k = int(np.argmax(np.abs(diff)))
        if abs(diff[k]) <= scale:
            return
        center = lo + k + h
        direction = np.sign(diff[k])
        slope = direction * rate[lo:hi]  # positive through the transition
        peak = slope[center - lo]
        a = b = center
        quiet = 0
        for i in range(center - 1, lo - 1, -1):  # back to where the climb began
            quiet = 0 if slope[i - lo] >= CLIMB * peak else quiet + 1
            if quiet > window:
                break
            if quiet == 0:
                a = i
        quiet = 0
        for j in range(center + 1, hi):  # on to where it levels off
            quiet = 0 if slope[j - lo] >= CLIMB * peak else quiet + 1
            if quiet > window:
                break
            if quiet == 0:
                b = j
        half = max(1, window // 2)
        before = float(np.median(values[max(lo, a - window): a + half + 1]))
        after = float(np.median(values[b - half: min(hi, b + window + 1)]))
        change = after - before
        if abs(change) > threshold and np.sign(change) == direction:
            i10, i90 = _window(smoothed, a, b, direction)
            # the steepest change inside its own window (the search's centre can sit on a shoulder of it)
            step = i10 + int(np.argmax(direction * rate[i10: i90 + 1]))
            if (steps[i90] - steps[i10]) <= MAX_WINDOW_FRACTION * span and not _drift(steps, smoothed, i10, i90, a, b, direction, window):
                found.append(Transition(int(steps[step]), int(steps[i10]), int(steps[i90]), before, after,
                                        abs(change) / max(sigma, scale)))
        search(lo, a)
        search(b + 1, hi)

    search(0, n)
    return sorted(found, key=lambda t: t.step)


def detect_transitions(metrics: pd.DataFrame, prefer: Prefer = "densest") -> pd.DataFrame:
    """Transitions of every (probe, metric, layer, head) series in a metrics frame.

    Where a series has values from both sources (live and checkpoint), `prefer` picks the curve searched
    (`signals.sources.prefer_source`; None: both, each on its own); `source` names it on every transition.
    """
    rows = []
    if len(metrics):
        keys = ["probe", "metric", "layer", "head", "source"]
        frame = prefer_source(metrics, prefer).copy()
        frame[["layer", "head"]] = frame[["layer", "head"]].astype("float").fillna(-1).astype(int)
        for (probe, metric, layer, head, source), group in frame.groupby(keys, sort=True):
            series = group.sort_values("step")
            for t in find_transitions(series["step"].to_numpy(), series["value"].to_numpy()):
                rows.append({"probe": probe, "metric": metric, "layer": None if layer < 0 else layer,
                             "head": None if head < 0 else head, **asdict(t), "source": source})
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.astype({"layer": "Int64", "head": "Int64"})


def moving_with(transitions: pd.DataFrame, start: int, end: int, exclude: tuple[str, str] | None = None) -> pd.DataFrame:
    """Transitions of other series whose step falls in the window [start, end], strongest first.

    One row per (probe, metric, layer, head) series; `exclude` leaves out one (probe, metric) series.
    """
    inside = transitions[(transitions["step"] >= start) & (transitions["step"] <= end)]
    if exclude is not None:
        inside = inside[~((inside["probe"] == exclude[0]) & (inside["metric"] == exclude[1]))]
    inside = inside.sort_values("strength", ascending=False)
    return inside.drop_duplicates(["probe", "metric", "layer", "head"])


def series_label(row) -> str:
    """`prev_token L0H1`, `coherence L0`, `copy`: how the report names one series."""
    layer, head = row["layer"], row["head"]
    where = "" if pd.isna(layer) else f" L{int(layer)}" + ("" if pd.isna(head) else f"H{int(head)}")
    return f"{row['metric']}{where}"
