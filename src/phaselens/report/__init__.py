"""`phaselens report RUN`: figures and a `report.md` that says what happened in a run, and when.

Reads the run only through the public run API; never imports torch, so a report of a finished
run is quick to write on any machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from phaselens.analysis.induction import summarize_induction
from phaselens.report.figures import (
    Figure,
    plot_dashboard,
    plot_entropy_heatmap,
    plot_head_scores,
    plot_logit_lens,
    plot_patching,
)
from phaselens.run import Run, open_run

MAX_TRANSITION_ROWS = 40
TRANSITION_COLUMNS = ["probe", "metric", "layer", "head", "step", "start", "end", "before", "after"]
CONFIG_SECTIONS = ("model", "data", "train", "telemetry")
FIGURE_FILES = ("dashboard.png", "entropy_heatmap.png", "head_scores.png", "logit_lens.png", "patching.png")
POST_HOC_PROBES = ("logit_lens", "patching", "attention_to")  # measured on checkpoints only, by `phaselens probe`


def write_report(run: str | Path | Run) -> Path:
    """Write the figures and `report.md` into `RUN/report/`; returns the path of report.md."""
    run = run if isinstance(run, Run) else open_run(run)
    out = run.dir.report
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # a figure this run cannot draw must not survive from an older report
        (out / name).unlink(missing_ok=True)

    summary = summarize_induction(run)
    # only a transition the summary calls an induction transition is marked: figures agree with the text
    transition = summary.transition
    metrics = _figure_metrics(run)
    vocab = int(run.config["model"]["d_vocab"])
    figures = {
        "dashboard": plot_dashboard(metrics, transition, vocab, out / "dashboard.png"),
        "entropy_heatmap": plot_entropy_heatmap(metrics, transition, out / "entropy_heatmap.png"),
        "head_scores": plot_head_scores(metrics, transition, out / "head_scores.png"),
    }
    post_hoc = _post_hoc_metrics(run)
    if len(post_hoc):
        figures["logit_lens"] = plot_logit_lens(post_hoc, transition, vocab, out / "logit_lens.png")
        figures["patching"] = plot_patching(post_hoc, transition, out / "patching.png")
    sections = [
        f"# phaselens report: {run.name}",
        _overview(run, metrics, post_hoc),
        "## What happened\n\n" + "\n\n".join(summary.text().splitlines()),
        "## Configuration\n\n" + _config_table(run.config),
        "## Detected transitions\n\n" + _transitions_section(run.transitions()),
        "## Figures\n\n" + _figures_section(figures, transition) + _post_hoc_hint(run, post_hoc),
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _figure_metrics(run: Run) -> pd.DataFrame:
    """Live telemetry; checkpoint values only for a run that has no live telemetry at all (a post-hoc series)."""
    live = run.metrics(source="live")
    return live if len(live) else run.metrics(source="checkpoint")


def _post_hoc_metrics(run: Run) -> pd.DataFrame:
    """Checkpoint rows of the probes that only `phaselens probe` measures (empty until it has run)."""
    rows = run.metrics(source="checkpoint")
    return rows[rows["probe"].isin(POST_HOC_PROBES)]


def _overview(run: Run, metrics: pd.DataFrame, post_hoc: pd.DataFrame) -> str:
    if metrics.empty:
        return f"Run `{run.path}` ({run.status}): no metrics recorded yet."
    probes = ", ".join(f"`{p}`" for p in sorted(metrics["probe"].unique()))
    text = (f"Run `{run.path}` ({run.status}): {int(metrics['step'].max())} steps; "
            f"{metrics['source'].iloc[0]} metrics of probes {probes}.")
    if len(post_hoc):
        probes = ", ".join(f"`{p}`" for p in sorted(post_hoc["probe"].unique()))
        text += f" Post-hoc probes {probes} measured on {post_hoc['step'].nunique()} checkpoints."
    return text


def _config_table(config: dict) -> str:
    rows = ["| setting | value |", "|---|---|"]
    for section in CONFIG_SECTIONS:
        for key, value in (config.get(section) or {}).items():
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            rows.append(f"| `{section}.{key}` | {shown} |")
    return "\n".join(rows)


def _cell(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _transitions_section(transitions: pd.DataFrame) -> str:
    if transitions.empty:
        return "No transitions detected: no series moved clearly more than its own step-to-step noise."
    total = len(transitions)
    shown = transitions.sort_values("strength", ascending=False).head(MAX_TRANSITION_ROWS)
    intro = (
        f"{total} transitions in all, strongest first (strength = change over the series' noise)"
        + (f"; the {len(shown)} strongest are shown." if total > len(shown) else ".")
        + " `step` is the steepest change, `start`–`end` the window where 10% and 90% of it are reached."
    )
    rows = ["| " + " | ".join(TRANSITION_COLUMNS) + " |", "|" + "---|" * len(TRANSITION_COLUMNS)]
    for record in shown[TRANSITION_COLUMNS].astype(object).itertuples(index=False):
        rows.append("| " + " | ".join(_cell(v) for v in record) + " |")
    return intro + "\n\n" + "\n".join(rows)


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


def _figures_section(figures: dict[str, Figure], transition: dict | None) -> str:
    captions = _captions(transition)
    parts = []
    for name, figure in figures.items():
        if figure.path is None:
            parts.append(f"**{name}** left out: this run did not record " + "; ".join(figure.missing) + ".")
            continue
        part = f"![{name}]({figure.path.name})\n\n*{captions[name]}*"
        if figure.missing:
            part += "\n\nNot drawn (not recorded in this run): " + "; ".join(figure.missing) + "."
        parts.append(part)
    return "\n\n".join(parts)
