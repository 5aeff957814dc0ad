"""The report part of the induction study: did an induction head form, and when."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from phaselens.analysis.induction import summarize_induction
from phaselens.report import StudyReport, figures_section, register_study
from phaselens.report.figures import (
    plot_dashboard,
    plot_entropy_heatmap,
    plot_head_scores,
    plot_logit_lens,
    plot_patching,
)
from phaselens.run import Run

POST_HOC_PROBES = ("logit_lens", "patching", "attention_to")  # measured on checkpoints only, by `phaselens probe`


@register_study("induction")
def induction_study(run: Run, out: Path) -> StudyReport:
    summary = summarize_induction(run)
    # only a transition the summary calls an induction transition is marked: figures agree with the text
    transition = summary.transition
    metrics = figure_metrics(run)
    vocab = int(run.config["model"]["d_vocab"])
    figures = {
        "dashboard": plot_dashboard(metrics, transition, vocab, out / "dashboard.png"),
        "entropy_heatmap": plot_entropy_heatmap(metrics, transition, out / "entropy_heatmap.png"),
        "head_scores": plot_head_scores(metrics, transition, out / "head_scores.png"),
    }
    post_hoc = post_hoc_metrics(run)
    if len(post_hoc):
        figures["logit_lens"] = plot_logit_lens(post_hoc, transition, vocab, out / "logit_lens.png")
        figures["patching"] = plot_patching(post_hoc, transition, out / "patching.png")
    return StudyReport(
        summary=[_overview(run, metrics, post_hoc), "## What happened\n\n" + "\n\n".join(summary.text().splitlines())],
        figures=figures_section(figures, _captions(transition)) + _post_hoc_hint(run, post_hoc),
    )


def figure_metrics(run: Run) -> pd.DataFrame:
    """One curve per series: live telemetry where the run recorded it, else checkpoint values (a post-hoc series)."""
    return run.metrics(prefer="live")


def post_hoc_metrics(run: Run) -> pd.DataFrame:
    """Checkpoint rows of the probes that only `phaselens probe` measures (empty until it has run)."""
    rows = run.metrics(source="checkpoint")
    return rows[rows["probe"].isin(POST_HOC_PROBES)]


def _overview(run: Run, metrics: pd.DataFrame, post_hoc: pd.DataFrame) -> str:
    if metrics.empty:
        return f"Run `{run.path}` ({run.status}): no metrics recorded yet."
    source = "live" if (metrics["source"] == "live").any() else "checkpoint"  # the telemetry, else the post-hoc values
    probes = ", ".join(f"`{p}`" for p in sorted(metrics.loc[metrics["source"] == source, "probe"].unique()))
    text = (f"Run `{run.path}` ({run.status}): {int(metrics['step'].max())} steps; "
            f"{source} metrics of probes {probes}.")
    if len(post_hoc):
        probes = ", ".join(f"`{p}`" for p in sorted(post_hoc["probe"].unique()))
        text += f" Post-hoc probes {probes} measured on {post_hoc['step'].nunique()} checkpoints."
    return text


LOGIT_LENS_CAPTION = (
    "Logit lens at every checkpoint: the mean probability of the correct next token (all predictions of the "
    "probe batch) when residual stream ℓ is read through the final norm and unembedding; 0 = embeddings, the "
    "last row = the model's output."
)
PATCHING_CAPTION = (
    "Activation patching at every checkpoint: the source segment of each probe sequence is replaced by random "
    "tokens, then residual stream ℓ at those positions is restored from the clean run; e_ℓ is the rise in "
    "p(correct token) at the copy positions (0 = embeddings; the last stream only feeds its own positions, so its "
    "effect stays 0). z_dependence = mean over sequences of max_ℓ e_ℓ; panel (c), where measured, is each head's "
    "attention from the copy positions to the source segment."
)


def _captions(transition: dict | None) -> dict[str, str]:
    """One line per figure saying what to look at."""
    if transition is None:
        return {
            "dashboard": "No induction transition was found, so none is marked. An induction head shows as the copy-position "
                         "loss dropping from chance (dotted) while the induction and previous-token scores rise together.",
            "entropy_heatmap": "Attention entropy per head (rows) over steps (columns): a head that specialises turns dark (focused).",
            "head_scores": "Every head's induction, previous-token and duplicate score; none has risen far if no induction head formed.",
            "logit_lens": LOGIT_LENS_CAPTION + " No induction transition was found, so none is marked.",
            "patching": PATCHING_CAPTION + " No induction transition was found, so none is marked.",
        }
    step = f"step {transition['step']}"
    at = f"{step} (dashed line; shaded: the 10–90% window {transition['start']}–{transition['end']})"
    return {
        "dashboard": f"Look at {at}: the copy-position loss leaves chance while the non-copy loss bumps up, the induction "
                     "and previous-token heads rise together, and each layer's coherence and specialization jump.",
        "entropy_heatmap": f"Attention entropy per head (rows) over steps (columns); at {step} (dashed line) "
                           "the heads that form the circuit turn dark (focused).",
        "head_scores": f"Every head's induction, previous-token and duplicate score; look at {at} for the heads that "
                       "specialise and which one leads.",
        "logit_lens": LOGIT_LENS_CAPTION + f" Look at {at}: the output row brightens as copies become predictable, "
                      "while the streams before the induction head's layer stay near chance on random tokens.",
        "patching": PATCHING_CAPTION + f" Look at {at}: the effect of the streams that feed the induction head (the "
                    "embeddings and the layers before it) rises as the copies start to depend on the source.",
    }


def _post_hoc_hint(run: Run, post_hoc: pd.DataFrame) -> str:
    if len(post_hoc):
        return ""
    return (f"\n\nNo post-hoc probe results yet: run `phaselens probe RUN` to add logit-lens and patching figures "
            f"(here: `phaselens probe {run.path}`).")
