"""The report part of an imported checkpoint series (task `tokenized_text`, `phaselens import-hf`): what was
imported, what has been measured on it, its headline curves in one figure, and their transitions.

The headline curves of a series are the ones that say what its model learned when: the loss on the probe
text, the strongest induction and previous-token heads (on the run's induction batch of repeated random
tokens in the model's own vocabulary) and, with long enough contexts, the in-context score.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from phaselens.report import StudyReport, checkpoints_measured, figures_section, register_study
from phaselens.report.figures import plot_series_headlines, top_heads
from phaselens.report.geometry import log_spaced
from phaselens.run import Run
from phaselens.signals.levels import final_level, initial_level
from phaselens.signals.transitions import MIN_EFFECT, MIN_POINTS, series_label

HEADLINE_SERIES = (("loss", "all"), ("loss", "eval"), ("heads", "induction"), ("heads", "prev_token"), ("loss", "icl_score"))
MAX_LISTED = 12  # transitions listed in the summary; the rest are in the shared table
SCORE_NAMES = {"induction": "induction", "prev_token": "previous-token"}
CAPTION = ("The headline curves at each revision (one point per revision; revisions that repeat another's weights left "
           "out): (a) the loss on the probe text, against the uniform guess over the vocabulary (dotted); (b) the head "
           "with the highest final induction score and the one with the highest final previous-token score, on the "
           "run's induction batch (repeated random tokens of the model's own vocabulary); (c) where measured, the "
           "in-context score. Dashed lines over shaded windows: the transitions found on each drawn curve (step of "
           "steepest change, 10–90% window).")


def series_metrics(run: Run) -> pd.DataFrame:
    """The checkpoint rows of the series, without the revisions whose weights repeat another's (not training)."""
    rows = run.metrics(source="checkpoint")
    duplicates = run.identical_steps()
    return rows[~rows["step"].isin(list(duplicates))] if duplicates else rows


def curve_transitions(run: Run) -> pd.DataFrame:
    """The detected transitions of the headline series (already past the detector's floors), earliest first."""
    found = pd.concat([run.transitions(probe=probe) for probe in dict.fromkeys(p for p, _ in HEADLINE_SERIES)],
                      ignore_index=True)
    keep = pd.Series(False, index=found.index)
    for probe, metric in HEADLINE_SERIES:
        keep |= (found["probe"] == probe) & (found["metric"] == metric)
    return found[keep].sort_values(["step", "probe", "metric"])


def _imported_text(run: Run) -> str:
    imported = run.record.imported
    revisions = imported.revisions if imported else {}
    model, data = run.config.get("model", {}), run.config.get("data", {})
    steps = sorted(int(step) for step in revisions)
    shape = ", ".join(part for part in (
        model.get("architecture"),
        f"{model['n_layers']} layers × {model['n_heads']} heads" if model.get("n_layers") and model.get("n_heads") else "",
        f"d_model {model['d_model']}" if model.get("d_model") else "",
        f"vocabulary {model['d_vocab']}" if model.get("d_vocab") else "") if part)
    names = list(revisions.values())
    text = (f"Checkpoint series `{imported.source if imported else model.get('source')}`" + (f" ({shape})" if shape else "")
            + f": {len(revisions)} revisions ({', '.join(names[:3])}{', …, ' + names[-1] if len(names) > 3 else ''})")
    if steps:
        text += f" at steps {steps[0]}–{steps[-1]}"
    return (text + ", loaded one at a time through TransformerLens's TransformerBridge. Probe batch: "
            f"{data.get('probe_size')} crops of {data.get('seq_len')} tokens of `{Path(data.get('path', '')).name}`; "
            "head scores read the run's induction batch (repeated random tokens of the model's own vocabulary).")


def _curves_text(metrics: pd.DataFrame, vocab: int) -> str:
    """Where each headline curve starts and ends (first and last levels, `signals.levels`)."""
    parts = []
    loss = metrics[(metrics["probe"] == "loss") & (metrics["metric"] == "all")].sort_values("step")
    if len(loss):
        parts.append(f"the loss on the probe text goes {initial_level(loss['value']):.2f} → {final_level(loss['value']):.2f} "
                     f"nats (uniform guess: ln {vocab} = {math.log(vocab):.2f})")
    for label, series in top_heads(metrics):
        layer, head = series.name
        score = label.split()[-1]
        parts.append(f"the strongest {SCORE_NAMES[score]} head, L{int(layer)}H{int(head)}, scores "
                     f"{initial_level(series):.2f} → {final_level(series):.2f}")
    if not parts:
        return ""
    return "From the first revision to the last, " + "; ".join(parts) + "."


def _transitions_text(found: pd.DataFrame, metrics: pd.DataFrame) -> str:
    if found.empty:
        points = metrics["step"].nunique()
        if points < MIN_POINTS:
            why = (f"a curve needs at least {MIN_POINTS} measured revisions to tell a step from noise, and this series "
                   f"has {points}; import more revisions to find them")
        else:
            why = ("none moved more than three times its own noise and by at least "
                   f"{MIN_EFFECT:.0%} of its metric's range")
        return f"No transition in the headline curves: {why}."
    lines = []
    for row in found.head(MAX_LISTED).to_dict("records"):
        lines.append(f"- {row['probe']} {series_label(row)}: {row['before']:.2f} → {row['after']:.2f} at step {row['step']} "
                     f"(10–90% window {row['start']}–{row['end']}; effect {row['effect']:.2f} of the metric's range, "
                     f"{row['strength']:.0f}× its noise)")
    return (f"Transitions of the headline curves (each past the detector's floors: more than three times the curve's "
            f"noise and at least {MIN_EFFECT:.0%} of its metric's range), earliest first:\n\n" + "\n".join(lines)
            + (f"\n\n{len(found) - MAX_LISTED} more in the table below." if len(found) > MAX_LISTED else ""))


@register_study("tokenized_text")
def imported_series_study(run: Run, out: Path) -> StudyReport:
    """An imported checkpoint series: what was imported and measured, its headline curves and their transitions."""
    measured = run.metrics(source="checkpoint")
    text = _imported_text(run) + "\n\n" + checkpoints_measured(run, measured)
    identical = run.identical_revisions()
    if identical:
        text += ("\n\n**Identical revisions** (same weights, byte for byte; left out of the curves and of transition "
                 "detection):\n\n" + "\n".join(f"- {line}" for line in identical))
    if measured.empty:
        return StudyReport(summary=[text])
    metrics = series_metrics(run)
    vocab = int(run.config.get("model", {}).get("d_vocab") or 2)
    found = curve_transitions(run)
    summary = [text, "## What the series shows\n\n" + "\n\n".join(
        part for part in (_curves_text(metrics, vocab), _transitions_text(found, metrics)) if part)]
    figure = plot_series_headlines(metrics, found, vocab, out / "series.png",
                                   log_steps=log_spaced(sorted(metrics["step"].unique())))
    return StudyReport(summary=summary, figures=figures_section({"series": figure}, {"series": CAPTION}))
