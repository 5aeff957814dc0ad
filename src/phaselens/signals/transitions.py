"""Change-point analysis: find the phase transitions in every metric series.

A transition is a sustained move of a series from one level to another. For each series we
smooth it (rolling median, then mean), take the step of steepest change and extend outwards
while the slope stays above 30% of that peak slope: the steep core of the change. The core is
then widened, a step at a time on each side in turn, for as long as the curve keeps moving the
same way: the block at the change's edge is compared with a block further out, at a distance of
half the change's width so far (blocks of max(w, half the core) points, compared by their
medians), and the change goes on while the curve moves between them at a quarter of the core's
mean rate or more and by more than three times the noise of such a difference. Medians of blocks
are robust to the point noise that stops a slope rule early, and a slow slide next to a sharp
change moves too slowly to join it. So a change ends where the curve levels
off (a plateau), not where its slope first dips, and its levels before and after are read on
the flat stretches on either side (medians of w points). It is reported when

* the change is large against the noise: |after − before| > 3σ and > 10σ/√w, with σ the
  robust (MAD) spread of the raw values around the smooth curve and w the smoothing window;
* the change is large against the metric: its effect size, |after − before| over the metric's
  range (the largest 1%–99% quantile range of any series of that probe and metric, e.g. of all
  heads' induction scores), is at least `MIN_EFFECT` (10%), so a head that moves 0.041 → 0.038
  while others span 0 → 0.7 is not a transition, however quiet its own series is;
* it is a transition, not a drift: the 10%–90% window spans at most 40% of the series, and just
  before the climb begins and just after it levels off the curve moves at less than half the rate
  it moves inside the window;
* the series has at least `MIN_POINTS` (12) finite points: fewer cannot tell a step from noise.

The window is read off the smooth curve between where the change begins and where it levels
off (the steps where 10% and 90% of its move are reached), and the reported step is the steepest
point inside that window, so start ≤ step ≤ end.

Each side of a found transition is searched again, so a bump (up, then down) gives two.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from phaselens.signals.sources import Prefer, prefer_source
from phaselens.tasks.study import LEAVE_TOLERANCE, Phenomenon

COLUMNS = ["probe", "metric", "layer", "head", "step", "start", "end", "before", "after", "strength", "effect", "source"]
MIN_POINTS = 12
MAX_PER_SERIES = 4
MAX_WINDOW_FRACTION = 0.4
CLIMB = 0.3  # a transition's climb begins and ends where the smooth slope falls under 30% of its peak
DRIFT_RATE = 0.5  # a move is a drift when next to its window the curve moves at half its rate or more
EXTEND = 0.3  # the change goes on outward while the curve moves at 35% of its core's mean rate or more
MIN_EFFECT = 0.1  # a transition moves its series by at least 10% of its metric's range
RANGE_QUANTILES = (0.01, 0.99)  # a series' range: robust to a spike
# Series that describe a measurement rather than the model: another series' standard error or spread, its confidence
# bounds, the rank agreement of two estimators. Their moves are not the model's transitions: searched only on request.
MEASUREMENT_SUFFIXES = ("_se", "_std", "_lo", "_hi")
MEASUREMENT_PREFIXES = ("spearman_",)


def describes_a_measurement(metric: str) -> bool:
    """Whether `metric` is a measurement's own noise or agreement (`MEASUREMENT_SUFFIXES`, `MEASUREMENT_PREFIXES`)."""
    return metric.endswith(MEASUREMENT_SUFFIXES) or metric.startswith(MEASUREMENT_PREFIXES)


@dataclass(frozen=True)
class Transition:
    step: int  # steepest change
    start: int  # 10% of the change reached
    end: int  # 90% of the change reached
    before: float
    after: float
    strength: float  # |after − before| in units of the point noise σ
    effect: float = float("nan")  # |after − before| over the metric's range (see the module docstring)


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


def series_range(values: np.ndarray) -> float:
    """The 1%–99% quantile range of a series' finite values: its range, robust to a spike."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0
    lo, hi = np.quantile(values, RANGE_QUANTILES)
    return float(hi - lo)


def _extend(values: np.ndarray, smoothed: np.ndarray, a: int, b: int, lo: int, hi: int, direction: float,
            window: int, noise: float) -> tuple[int, int]:
    """Widen the core [a, b] of a change while the curve keeps moving its way (see the module docstring).

    values, smoothed (n,): raw and smooth curve; [lo, hi) bounds the search; `noise`: the point noise σ.
    """
    block = max(window, (b - a + 1) // 2)
    noise_floor = 3 * 1.77 * noise / np.sqrt(block)  # 3× the spread of a difference of two block medians

    rate = abs(smoothed[b] - smoothed[a]) / max(1, b - a)  # the core's mean rate, per point

    def moves(earlier: np.ndarray, later: np.ndarray, distance: int) -> bool:
        """Whether the curve moves its way from block `earlier` to block `later`, `distance` points on, fast enough."""
        change = direction * (np.median(later) - np.median(earlier))
        return change > max(noise_floor, EXTEND * rate * distance)

    while True:  # each side in turn, so each is judged at the change's width so far
        distance = max(block, (b - a) // 2)
        back = a - distance >= lo and moves(values[a - distance: a - distance + block], values[a: a + block], distance)
        if back:  # back towards where the change begins
            a -= max(1, block // 2)
        distance = max(block, (b - a) // 2)
        on = b + distance < hi and moves(values[b - block + 1: b + 1], values[b + distance - block + 1: b + distance + 1], distance)
        if on:  # on towards where it levels off
            b += max(1, block // 2)
        if not (back or on):
            break
    return max(lo, a), min(hi - 1, b)


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


def find_transitions(steps: np.ndarray, values: np.ndarray, metric_scale: float | None = None) -> list[Transition]:
    """Transitions of one series (steps ascending), earliest first.

    `metric_scale`: the metric's range the effect size is measured against (default, and at least: this series' own range).
    """
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
    metric_range = max(series_range(values), metric_scale or 0.0, 1e-12)
    rate = np.gradient(smoothed)  # change per point of the smooth curve
    found: list[Transition] = []

    def judge(a: int, b: int, lo: int, hi: int, direction: float) -> Transition | None:
        """The change from index a to b as a transition, or None where it is below a floor or a drift."""
        half = max(1, window // 2)
        before = float(np.median(values[max(lo, a - window): a + half + 1]))
        after = float(np.median(values[b - half: min(hi, b + window + 1)]))
        change = after - before
        effect = abs(change) / metric_range
        if not (abs(change) > threshold and effect >= MIN_EFFECT and np.sign(change) == direction):
            return None
        i10, i90 = _window(smoothed, a, b, direction)
        # the steepest change inside its own window (the search's centre can sit on a shoulder of it)
        step = i10 + int(np.argmax(direction * rate[i10: i90 + 1]))
        if (steps[i90] - steps[i10]) > MAX_WINDOW_FRACTION * span or _drift(steps, smoothed, i10, i90, a, b, direction, window):
            return None
        return Transition(int(steps[step]), int(steps[i10]), int(steps[i90]), before, after,
                          abs(change) / max(sigma, scale), min(1.0, effect))

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
        for a, b in (_extend(values, smoothed, a, b, lo, hi, direction, window, sigma), (a, b)):
            found_one = judge(a, b, lo, hi, direction)  # the widened change, else its core alone (a slide beside it is a drift)
            if found_one is not None:
                found.append(found_one)
                break
        search(lo, a)
        search(b + 1, hi)

    search(0, n)
    return sorted(found, key=lambda t: t.step)


def detect_transitions(metrics: pd.DataFrame, prefer: Prefer = "densest", measurements: bool = False) -> pd.DataFrame:
    """Transitions of every (probe, metric, layer, head) series in a metrics frame.

    Where a series has values from both sources (live and checkpoint), `prefer` picks the curve searched
    (`signals.sources.prefer_source`; None: both, each on its own); `source` names it on every transition.
    Series that describe a measurement (`describes_a_measurement`: standard errors, confidence bounds, method
    agreement) are left out unless `measurements`.
    """
    rows = []
    if len(metrics) and not measurements:
        metrics = metrics[~metrics["metric"].map(describes_a_measurement)]
    if len(metrics):
        keys = ["probe", "metric", "layer", "head", "source"]
        frame = prefer_source(metrics, prefer).copy()
        frame[["layer", "head"]] = frame[["layer", "head"]].astype("float").fillna(-1).astype(int)
        ranges = metric_ranges(frame)
        for (probe, metric, layer, head, source), group in frame.groupby(keys, sort=True):
            series = group.sort_values("step")
            for t in find_transitions(series["step"].to_numpy(), series["value"].to_numpy(), ranges[(probe, metric, source)]):
                rows.append({"probe": probe, "metric": metric, "layer": None if layer < 0 else layer,
                             "head": None if head < 0 else head, **asdict(t), "source": source})
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.astype({"layer": "Int64", "head": "Int64"})


def metric_ranges(frame: pd.DataFrame) -> dict[tuple, float]:
    """(probe, metric, source) -> the largest `series_range` of its series: the scale its effect sizes are read on."""
    keys = ["probe", "metric", "layer", "head", "source"]
    per_series = frame.groupby(keys, sort=False)["value"].agg(series_range)
    return per_series.groupby(level=["probe", "metric", "source"]).max().to_dict()


def headline_transitions(transitions: pd.DataFrame, phenomenon: Phenomenon | None,
                         config: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The transitions that are the study's phenomenon (`tasks.study.Phenomenon`), earliest first.

    Those of its series that move its way by at least `min_change` and, where it leaves a level
    (log of a config value; `config` is the run's nested config), start nearer that level than they end
    and end more than LEAVE_TOLERANCE of it past it. Empty where the study declares no phenomenon.
    """
    if phenomenon is None or transitions.empty:
        return transitions.iloc[0:0]
    rows = transitions[(transitions["probe"] == phenomenon.probe) & (transitions["metric"] == phenomenon.metric)
                       & transitions["layer"].isna()]
    sign = -1.0 if phenomenon.direction == "fall" else 1.0
    moved = sign * (rows["after"] - rows["before"])
    rows = rows[moved >= max(phenomenon.min_change, 1e-12)]
    if phenomenon.leaves_log_of is not None:
        level = _log_of(config or {}, phenomenon.leaves_log_of)
        if level is None:
            return rows.iloc[0:0]
        past = sign * (rows["after"] - level) > LEAVE_TOLERANCE * abs(level)
        nearer = (rows["before"] - level).abs() < (rows["after"] - level).abs()
        rows = rows[past & nearer]
    return rows.sort_values("step")


def _log_of(config: Mapping[str, Any], dotted: str) -> float | None:
    """log of the value at a dotted key of a nested config; None where it is missing or not above 1."""
    value: Any = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    try:
        return math.log(float(value)) if float(value) > 1 else None
    except (TypeError, ValueError):
        return None


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
