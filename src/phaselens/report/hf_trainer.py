"""The report part of a run trained by a `transformers.Trainer` with `pl.TelemetryCallback`."""

from __future__ import annotations

from pathlib import Path

from phaselens.report import StudyReport, checkpoints_measured, figures_section, register_study
from phaselens.report.figures import plot_entropy_heatmap, plot_head_scores
from phaselens.run import Run

CAPTIONS = {
    "entropy_heatmap": "Attention entropy of every head at every measured step, from the Trainer's own training forward.",
    "head_scores": "Induction, previous-token and duplicate-token scores of every head on the training batches.",
}


@register_study("hf_trainer")
def trainer_study(run: Run, out: Path) -> StudyReport:
    model, data = run.config["model"], run.config.get("data") or {}
    revisions = run.record.imported.revisions if run.record.imported else {}
    live = run.metrics(source="live")
    text = (f"Run `{run.path}` ({run.status}): a {model.get('architecture') or 'Hugging Face model'} "
            f"({model.get('n_layers')} layers × {model.get('n_heads')} heads) trained by `transformers.Trainer` on "
            f"{data.get('dataset') or 'its dataset'}, {run.record.steps_done if run.record.steps_done is not None else '?'} steps. "
            f"{len(revisions)} checkpoints, referenced in `{model.get('source')}`.")
    if len(live):
        probes = ", ".join(f"`{p}`" for p in sorted(live["probe"].unique()))
        text += f" Live probes {probes} at {live['step'].nunique()} steps."
    measured = run.metrics(source="checkpoint")
    text += "\n\n" + checkpoints_measured(run, measured)
    metrics = run.metrics(prefer="live")
    figures = {
        "entropy_heatmap": plot_entropy_heatmap(metrics, None, out / "entropy_heatmap.png"),
        "head_scores": plot_head_scores(metrics, None, out / "head_scores.png"),
    }
    return StudyReport(summary=[text], figures=figures_section(figures, CAPTIONS))
