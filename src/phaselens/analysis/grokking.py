"""What a grokking run found: the accuracy lag, the progress measures, and the three phases they delimit.

Nanda et al. (2023) split grokking into memorisation, circuit formation and clean-up. Here the
boundaries come from the measured series:

* memorisation ends when train accuracy first reaches 1.0 (every training pair right);
* clean-up is the rise of test (held-out) accuracy: from the step it has made 10% of its rise to the
  step it has made 90% of it, the rise counted from its level at the end of memorisation to its
  final level (the median of its last 5%);
* circuit formation is what lies between: train accuracy is perfect and test accuracy has barely
  moved, while the Fourier circuit grows, seen as restricted loss falling and excluded loss rising.

A claim about a measure in a phase is made only when its change there exceeds 3σ of that series'
step-to-step noise (σ from the median absolute deviation of its differences).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from phaselens.analysis.headlines import register_headline
from phaselens.run import Run
from phaselens.signals.levels import final_level

TRAIN_SOLVED = 1.0  # train accuracy that ends memorisation
TEST_SOLVED = 0.95  # test accuracy that counts as generalised
NOISE_SIGMAS = 3.0  # a change must exceed this many σ of the series' noise to be claimed
LEVEL_POINTS = 2  # a level at a step is the median of the values within this many points of it


@dataclass(frozen=True)
class Phase:
    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Change:
    """A series' level at the start and end of an interval, and whether the move exceeds its noise."""

    before: float
    after: float
    noise: float  # σ of the series' step-to-step noise

    @property
    def clear(self) -> bool:
        return abs(self.after - self.before) > NOISE_SIGMAS * self.noise

    @property
    def rose(self) -> bool:
        return self.clear and self.after > self.before

    @property
    def fell(self) -> bool:
        return self.clear and self.after < self.before


@dataclass
class GrokkingSummary:
    """The findings of a grokking run, as numbers and as sentences."""

    steps: int
    p: int | None
    train_solved: int | None  # first step with train accuracy 1.0
    test_solved: int | None  # first step with test accuracy >= 0.95
    cleanup: tuple[int, int] | None  # the 10%–90% window of the test-accuracy rise
    restricted_half: int | None  # first step the restricted loss is halfway from its peak to its final level
    test_half: int | None  # the same for the test loss
    restricted: Change | None = None  # over circuit formation
    excluded: Change | None = None  # over circuit formation
    weight_norm: Change | None = None  # over clean-up
    test_loss: Change | None = None  # over clean-up
    memorised_test_loss: Change | None = None  # the test loss over memorisation
    gini: Change | None = None  # first to last value
    final_key_share: float | None = None
    key_frequencies: list[int] | None = None  # at the last step with an artifact
    key_step: int | None = None
    phases: list[Phase] = field(default_factory=list)

    @property
    def lag(self) -> int | None:
        """Steps from perfect train accuracy to test accuracy >= 0.95."""
        if self.train_solved is None or self.test_solved is None:
            return None
        return self.test_solved - self.train_solved

    def text(self) -> str:
        if self.train_solved is None:
            return f"No memorisation in {self.steps} steps: train accuracy never reached 1.0, so there is no grokking to describe."
        lines = []
        if self.test_solved is None:
            lines.append(f"Train accuracy reached 1.0 at step {self.train_solved}; test accuracy never passed "
                         f"{TEST_SOLVED} in {self.steps} steps (no grokking yet).")
        else:
            lines.append(f"Grokking: train accuracy reached 1.0 at step {self.train_solved}, test accuracy passed "
                         f"{TEST_SOLVED} at step {self.test_solved}: a lag of {self.lag} steps.")
        if self.phases:
            lines.append("Phases: " + "; ".join(f"{ph.name} {ph.start}–{ph.end}" for ph in self.phases) + ".")
        if self.restricted_half is not None and self.test_half is not None and self.restricted is not None:
            if self.restricted.fell and self.restricted_half < self.test_half:
                lines.append(f"Restricted loss fell before test loss: {self.restricted.before:.2f} → {self.restricted.after:.2f} "
                             f"during circuit formation; halfway down at step {self.restricted_half}, test loss at "
                             f"step {self.test_half}.")
            else:
                lines.append("Restricted loss did not fall clearly before test loss.")
        if self.excluded is not None:
            lines.append(f"Excluded loss {'rose' if self.excluded.rose else 'did not rise clearly'} during circuit formation: "
                         f"{self.excluded.before:.2f} → {self.excluded.after:.2f}.")
        if self.weight_norm is not None and self.weight_norm.fell:
            lines.append(f"Weight norm fell during clean-up: {self.weight_norm.before:.1f} → {self.weight_norm.after:.1f}.")
        if self.key_frequencies is not None:
            share = f", {self.final_key_share:.0%} of the embedding's squared Fourier norm" if self.final_key_share is not None else ""
            lines.append(f"Key frequencies at step {self.key_step}: {', '.join(map(str, self.key_frequencies)) or 'none'}{share}"
                         + (f"; Fourier Gini {self.gini.before:.2f} → {self.gini.after:.2f}." if self.gini is not None else "."))
        return "\n".join(lines)


# ---------------------------------------------------------------------------- series helpers


def series(metrics: pd.DataFrame, probe: str, metric: str) -> pd.DataFrame:
    """One per-model series (step, value) sorted by step: the live rows, then checkpoint rows after the last of them
    (the final weights are measured at the last checkpoint only)."""
    rows = metrics[(metrics["probe"] == probe) & (metrics["metric"] == metric)]
    if rows.empty:
        return rows[["step", "value"]]
    live = rows[rows["source"] == "live"]
    if len(live):
        rows = pd.concat([live, rows[(rows["source"] != "live") & (rows["step"] > live["step"].max())]])
    return rows.groupby("step", as_index=False)["value"].mean().sort_values("step")


def noise(values: np.ndarray) -> float:
    """σ of a series' step-to-step noise: the MAD of its differences, scaled to a Gaussian σ, over √2."""
    diffs = np.diff(np.asarray(values, dtype=float))
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2))


def level(frame: pd.DataFrame, step: int) -> float:
    """The series' level at `step`: the median of the values within LEVEL_POINTS points of the nearest one."""
    steps = frame["step"].to_numpy()
    i = int(np.argmin(np.abs(steps - step)))
    window = frame["value"].to_numpy()[max(0, i - LEVEL_POINTS): i + LEVEL_POINTS + 1]
    return float(np.median(window))


def change(frame: pd.DataFrame, start: int, end: int) -> Change | None:
    if len(frame) < 3:
        return None
    return Change(level(frame, start), level(frame, end), noise(frame["value"].to_numpy()))


def first_step(frame: pd.DataFrame, at_least: float) -> int | None:
    hits = frame[frame["value"] >= at_least - 1e-9]
    return int(hits["step"].iloc[0]) if len(hits) else None


def halfway_down(frame: pd.DataFrame) -> int | None:
    """First step after the series' peak where it is halfway down to its final level (the median of its last 5%)."""
    if len(frame) < 3:
        return None
    steps, values = frame["step"].to_numpy(), frame["value"].to_numpy()
    peak = int(np.nanargmax(values))
    final = final_level(values)
    half = (values[peak] + final) / 2
    below = np.nonzero((np.arange(len(values)) > peak) & (values <= half))[0]
    return int(steps[below[0]]) if len(below) else None


def accuracy_rise(test_acc: pd.DataFrame, after: int) -> tuple[int, int] | None:
    """The steps where test accuracy first makes 10% and 90% of its rise after step `after`, or None.

    The rise runs from the level at `after` to the final level (the median of the last 5%) and must
    exceed 3σ of the series' noise.
    """
    if len(test_acc) < 3:
        return None
    steps, values = test_acc["step"].to_numpy(), test_acc["value"].to_numpy()
    start = level(test_acc, after)
    final = final_level(values)
    if final - start <= NOISE_SIGMAS * noise(values):
        return None
    later = steps > after
    ten = np.nonzero(later & (values >= start + 0.1 * (final - start)))[0]
    ninety = np.nonzero(later & (values >= start + 0.9 * (final - start)))[0]
    if not len(ten) or not len(ninety):
        return None
    return int(steps[ten[0]]), int(steps[ninety[0]])


def key_frequency_artifact(run: Run) -> tuple[int, dict] | None:
    """The `grokking` probe's artifact (per-frequency norms, key frequencies) of the last step that has one."""
    folder = run.dir.artifacts / "grokking"
    files = sorted(folder.glob("step_*.json")) if folder.is_dir() else []
    if not files:
        return None
    return int(files[-1].stem.split("_")[1]), json.loads(files[-1].read_text())


# ---------------------------------------------------------------------------- the summary


def summarize_grokking(run: Run) -> GrokkingSummary:
    metrics = run.metrics()
    data = run.config.get("data") or {}
    steps = int((run.config.get("train") or {}).get("steps", 0))
    train_acc, test_acc = series(metrics, "loss", "train_acc"), series(metrics, "loss", "eval_acc")
    test_loss = series(metrics, "loss", "eval")
    restricted, excluded = series(metrics, "grokking", "restricted_loss"), series(metrics, "grokking", "excluded_loss")
    train_solved = first_step(train_acc, TRAIN_SOLVED)
    cleanup = accuracy_rise(test_acc, train_solved) if train_solved is not None else None
    summary = GrokkingSummary(
        steps=steps, p=data.get("p"), train_solved=train_solved, test_solved=first_step(test_acc, TEST_SOLVED),
        cleanup=cleanup, restricted_half=halfway_down(restricted), test_half=halfway_down(test_loss),
    )
    gini, share = series(metrics, "grokking", "fourier_gini"), series(metrics, "grokking", "key_frequency_share")
    if len(gini) >= 3:
        summary.gini = Change(float(gini["value"].iloc[0]), level(gini, int(gini["step"].iloc[-1])), noise(gini["value"].to_numpy()))
    if len(share):
        summary.final_key_share = level(share, int(share["step"].iloc[-1]))
    found = key_frequency_artifact(run)
    if found is not None:
        summary.key_step, artifact = found
        summary.key_frequencies = list(artifact["key_frequencies"])
    if cleanup is not None and train_solved < cleanup[0]:
        formation = (train_solved, cleanup[0])
        summary.phases = [Phase("memorisation", 0, train_solved), Phase("circuit formation", *formation),
                          Phase("clean-up", *cleanup)]
        summary.restricted = change(restricted, *formation)
        summary.excluded = change(excluded, *formation)
        summary.weight_norm = change(series(metrics, "grokking", "weight_norm"), *cleanup)
        summary.test_loss = change(test_loss, *cleanup)
        summary.memorised_test_loss = change(test_loss, 0, train_solved)
    return summary


@register_headline("grokking")
def grokking_headline(run: Run) -> dict[str, object]:
    """`compare`'s row of a run: τ (test accuracy >= 0.95), the step train accuracy reached 1.0, and the lag."""
    summary = summarize_grokking(run)
    return {"tau": summary.test_solved, "memorised": summary.train_solved, "lag": summary.lag}
