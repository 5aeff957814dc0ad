"""What a late-disambiguation run found: the plateau near log K, τ, and whether the mechanisms line up.

τ is the first step where the first-target loss is below 0.5·log K (the theory's unit: half the
uncertainty that B alone leaves). The alignment table puts the transition of every diagnostic
(loss, z-shuffle gap, attention to z, logit lens, z_dependence, random-z) side by side and asks
whether they happen together: each one's 10–90% window overlaps the first-target loss window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from phaselens.analysis.headlines import register_headline
from phaselens.signals.levels import final_level
from phaselens.signals.sources import prefer_source
from phaselens.signals.transitions import detect_transitions, headline_transitions
from phaselens.tasks.disambiguation_config import DROP_FROM_PLATEAU

PLATEAU_TOLERANCE = 0.15  # within 15% of log K
SMOOTH_POINTS = 5  # live first-target losses come from a few rows: a rolling median of this many steps

# (label, probe, metric): the diagnostics of the alignment table, in the order the mechanism is read
DIAGNOSTICS = (
    ("first-target loss", "loss", "first_target"),
    ("z-shuffle gap", "loss", "z_shuffle_gap"),
    ("attention to z", "attention_to", "mass"),
    ("logit lens p_correct", "logit_lens", "p_correct"),
    ("z_dependence", "patching", "z_dependence"),
    ("random-z p_drop", "random_z", "p_drop"),
)


def first_target_series(metrics: pd.DataFrame) -> pd.Series:
    """The first-target loss by step (live if recorded, else checkpoint), smoothed by a short rolling median."""
    rows = metrics[(metrics["probe"] == "loss") & (metrics["metric"] == "first_target")]
    if rows.empty:
        return pd.Series(dtype=float)
    series = prefer_source(rows, "live").groupby("step")["value"].mean().sort_index()
    return series.rolling(SMOOTH_POINTS, center=True, min_periods=1).median()


def tau(metrics: pd.DataFrame, k: int) -> int | None:
    """The first step where the (smoothed) first-target loss is below 0.5·log K; None if never (or K = 1)."""
    series = first_target_series(metrics)
    if k <= 1 or series.empty:
        return None
    below = series[series < 0.5 * math.log(k)]
    return int(below.index[0]) if len(below) else None


@dataclass
class Plateau:
    """The longest stretch before τ where the first-target loss stays within 15% of log K."""

    start: int
    end: int
    level: float  # median loss over the stretch

    @property
    def steps(self) -> int:
        return self.end - self.start


def plateau(metrics: pd.DataFrame, k: int) -> Plateau | None:
    series = first_target_series(metrics)
    if k <= 1 or series.empty:
        return None
    log_k = math.log(k)
    end_at = tau(metrics, k)
    before = series if end_at is None else series[series.index < end_at]
    near = (before - log_k).abs() <= PLATEAU_TOLERANCE * log_k
    best, run_start = None, None
    steps = before.index.to_numpy()
    for i, inside in enumerate(near.to_numpy()):
        if inside and run_start is None:
            run_start = i
        if run_start is not None and (not inside or i == len(near) - 1):
            last = i if inside else i - 1
            if best is None or steps[last] - steps[run_start] > best[1] - best[0]:
                best = (steps[run_start], steps[last])
            run_start = None
    if best is None:
        return None
    stretch = before[(before.index >= best[0]) & (before.index <= best[1])]
    return Plateau(int(best[0]), int(best[1]), float(stretch.median()))


@dataclass
class Alignment:
    """One row per diagnostic: its strongest transition (step, window) and whether it overlaps the loss window."""

    rows: list[dict] = field(default_factory=list)

    @property
    def reference(self) -> dict | None:
        return self.rows[0] if self.rows and self.rows[0]["step"] is not None else None

    def coincide(self) -> bool | None:
        """True when every measured diagnostic's window overlaps the first-target loss window."""
        measured = [r for r in self.rows[1:] if r["step"] is not None]
        if self.reference is None or not measured:
            return None
        return all(r["overlaps"] for r in measured)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["diagnostic", "probe", "metric", "series", "step", "start", "end", "before", "after", "effect",
                                        "overlaps"])


def _series_label(layer, head) -> str:
    if pd.isna(layer):
        return "model"
    return f"L{int(layer)}" + ("" if pd.isna(head) else f"H{int(head)}")


def alignment(metrics: pd.DataFrame, transitions: pd.DataFrame | None = None,
              headline: pd.DataFrame | None = None, k: int | None = None) -> Alignment:
    """Each diagnostic's transition beside the first-target loss's headline transition.

    The first row is the study's phenomenon, the drop from the log K plateau (`headline`: the run's
    `headline_transitions()`, earliest first), never simply the strongest first-target change. Every
    other diagnostic shows its strongest transition that overlaps that window where it has one, else
    its strongest (for per-layer/head metrics: of any of its series). Without `headline`, it is found
    in `transitions` by the study's declaration with ambiguity `k`.
    """
    if transitions is None:
        transitions = detect_transitions(metrics)
    if headline is None:
        headline = headline_transitions(transitions, DROP_FROM_PLATEAU, {"data": {"k": k}})
    found = Alignment()
    reference = None if headline is None or headline.empty else headline.iloc[0]
    for label, probe, metric in DIAGNOSTICS:
        measured = ((metrics["probe"] == probe) & (metrics["metric"] == metric)).any()
        if not measured:
            continue
        rows = transitions[(transitions["probe"] == probe) & (transitions["metric"] == metric)]
        row = {"diagnostic": label, "probe": probe, "metric": metric, "series": None, "step": None,
               "start": None, "end": None, "before": None, "after": None, "effect": None, "overlaps": None}
        if not found.rows:  # the first-target loss: its headline transition only
            rows = rows.iloc[0:0] if reference is None else headline.iloc[:1]
        elif reference is not None:
            inside = rows[(rows["start"] <= reference["end"]) & (rows["end"] >= reference["start"])]
            rows = inside if len(inside) else rows
        if len(rows):
            best = rows.loc[rows["strength"].idxmax()]
            row.update(series=_series_label(best["layer"], best["head"]), step=int(best["step"]),
                       start=int(best["start"]), end=int(best["end"]), before=float(best["before"]),
                       after=float(best["after"]), effect=float(best["effect"]))
        found.rows.append(row)
    ref = found.reference
    if ref is not None:
        for row in found.rows[1:]:
            if row["step"] is not None:
                row["overlaps"] = bool(row["start"] <= ref["end"] and ref["start"] <= row["end"])
    return found


@dataclass
class DisambiguationSummary:
    task: str
    k: int
    steps: int
    tau: int | None
    plateau: Plateau | None
    initial: float
    final: float
    final_gap: float
    alignment: Alignment

    def text(self) -> str:
        log_k = math.log(self.k) if self.k > 0 else float("nan")
        if math.isnan(self.final):
            return "No first-target loss was recorded, so there is nothing to say about disambiguation."
        lines = []
        if self.k <= 1:
            lines.append(f"K = 1: nothing to disambiguate. The first-target loss goes {self.initial:.2f} → {self.final:.2f} "
                         "with no plateau to wait on.")
        elif self.task in ("b_to_a",):
            lines.append(f"No selector ({self.task}): the first-target loss ends at {self.final:.2f}, against the "
                         f"irreducible log K = log {self.k} = {log_k:.2f}.")
        else:
            if self.plateau is not None:
                lines.append(f"Plateau: the first-target loss stays near log K = log {self.k} = {log_k:.2f} "
                             f"(median {self.plateau.level:.2f}) from step {self.plateau.start} to {self.plateau.end}.")
            else:
                lines.append(f"No plateau near log K = {log_k:.2f}: the first-target loss never stayed within "
                             f"{PLATEAU_TOLERANCE:.0%} of it.")
            if self.tau is not None:
                lines.append(f"τ = {self.tau}: the first step where the first-target loss is below 0.5·log K = "
                             f"{0.5 * log_k:.2f}; it ends at {self.final:.2f}, and the z-shuffled loss is "
                             f"{self.final_gap:.2f} above it (z is used).")
            else:
                lines.append(f"τ not reached in {self.steps} steps: the first-target loss ends at {self.final:.2f}, "
                             f"above 0.5·log K = {0.5 * log_k:.2f}.")
        verdict = self.alignment.coincide()
        if verdict is not None:
            ref = self.alignment.reference
            lines.append(("The diagnostics coincide: every transition's window overlaps the first-target loss window "
                          if verdict else "The diagnostics do not all coincide with the first-target loss window ")
                         + f"({ref['start']}–{ref['end']}).")
        return "\n".join(lines)


def summarize_disambiguation(run) -> DisambiguationSummary:
    """Plateau, τ and alignment of a run (read through the public run API)."""
    metrics = run.metrics()
    data = run.config.get("data") or {}
    k = int(data.get("k", 1))
    series = first_target_series(metrics)
    gap = metrics[(metrics["probe"] == "loss") & (metrics["metric"] == "z_shuffle_gap")]
    gap_series = gap.groupby("step")["value"].mean().sort_index()
    return DisambiguationSummary(
        task=run.task, k=k, steps=int(metrics["step"].max()) if len(metrics) else 0,
        tau=tau(metrics, k), plateau=plateau(metrics, k),
        initial=float(series.iloc[0]) if len(series) else float("nan"), final=final_level(series), final_gap=final_level(gap_series),
        alignment=alignment(metrics, run.transitions(), run.headline_transitions()),
    )


@register_headline("disambiguation")
def disambiguation_headline(run) -> dict[str, object]:
    """`compare`'s row of a run: K, τ, the plateau, the step of the drop from the plateau (`step_first_target`) and of
    each other diagnostic's transition beside it (as in the alignment table)."""
    metrics = run.metrics()
    k = int((run.config.get("data") or {}).get("k", 0) or 0)
    found = plateau(metrics, k)
    row: dict[str, object] = {"data.k": k, "tau": tau(metrics, k), "plateau_steps": found.steps if found else None,
                              "plateau_level": found.level if found else None}
    rows = alignment(metrics, run.transitions(), run.headline_transitions()).rows
    steps = {r["metric"] if r["probe"] == "loss" else r["probe"]: r["step"] for r in rows}
    for _, probe, metric in DIAGNOSTICS:
        name = metric if probe == "loss" else probe
        row[f"step_{name}"] = steps.get(name)
    return row
