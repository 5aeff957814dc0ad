"""Report parts for residual-stream geometry: the `geometry` section (any run that measured it).
The study of an imported checkpoint series is `report.imported_series`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from phaselens.analysis.phases import MIN_PHASE_CHECKPOINTS, MIN_PHASE_EFFECT, Phase, geometry_phases
from phaselens.models.sites import residual_label
from phaselens.report import figures_section, register_section
from phaselens.report.plotting import Figure, metric_rows, per_layer_table, plt, save_tight
from phaselens.run import Run
from phaselens.signals.sources import prefer_source

PHASE_COLOR = "#7a4fb0"
KL_METRICS = {"kl_unigram": "KL(p_model ‖ p_unigram)", "kl_unigram_reverse": "KL(p_unigram ‖ p_model)"}


def ie_label(layer: int, n_layers: int) -> str:
    """IE layer ℓ: 0 = embeddings, ℓ = after block ℓ−1, L+1 = after the final norm."""
    return residual_label(layer, n_layers)


def log_spaced(steps: np.ndarray) -> bool:
    """Checkpoints whose gaps grow over orders of magnitude (Pythia's 1, 2, 4, …, then 1,000s) read best on a log axis."""
    gaps = np.diff(np.asarray(steps, dtype=float))
    gaps = gaps[gaps > 0]
    return len(gaps) >= 2 and gaps.max() >= 10 * gaps.min()


def geometry_frame(run: Run) -> pd.DataFrame:
    """The run's geometry rows, each series from one source: the one with the most measured steps.

    Revisions that repeat another's weights are left out: they are not points of training.
    """
    rows = run.metrics(probe="geometry")
    duplicates = run.identical_steps()
    if duplicates:
        rows = rows[~rows["step"].isin(list(duplicates))]
    return prefer_source(rows, "densest")


def mean_ie(ie: pd.DataFrame) -> pd.Series:
    """IE averaged over the layers after the embeddings (the curve phases are cut on)."""
    layers = [c for c in ie.columns if int(c) > 0] or list(ie.columns)
    return ie[layers].mean(axis=1)


def plot_geometry(ie: pd.DataFrame, kl: dict[str, pd.Series], boundaries: list[int], path: Path,
                  log_steps: bool | None = None) -> Figure:
    """IE per layer against step (top), KL to the unigram against step (bottom); dotted lines at phase boundaries.

    ie: a step × layer table; kl: metric -> series indexed by step; log_steps None picks a log axis for log-spaced steps.
    """
    steps = ie.index.to_numpy()
    log_steps = log_spaced(steps) if log_steps is None else log_steps
    n_layers = int(max(ie.columns)) - 1
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, max(2, ie.shape[1])))
    for color, layer in zip(colors, ie.columns):
        top.plot(steps, ie[layer], color=color, lw=1.4, marker="o", ms=2.5, label=ie_label(int(layer), n_layers))
    top.set_ylabel("interaction energy")
    top.set_title("interaction energy per residual stream (e = all positions aligned)", fontsize=10)
    top.legend(fontsize=7, ncol=2 if ie.shape[1] > 6 else 1, loc="best")
    for (metric, series), style in zip(kl.items(), ("-", "--")):
        bottom.plot(series.index, series.values, color="black", ls=style, lw=1.4, marker="o", ms=2.5, label=KL_METRICS.get(metric, metric))
    bottom.set_ylabel("nats")
    bottom.set_title("KL divergence of the predictions to the unigram distribution", fontsize=10)
    bottom.legend(fontsize=8, loc="best")
    for ax in (top, bottom):
        for step in boundaries:
            ax.axvline(step, color=PHASE_COLOR, ls=":", lw=1.2)
        ax.grid(alpha=0.25)
        if log_steps:
            ax.set_xscale("symlog", linthresh=1)  # step 0 stays on the axis
    bottom.set_xlabel("step (log scale)" if log_steps else "step")
    fig.suptitle("Residual-stream geometry" + (" (dotted: phase boundaries)" if boundaries else ""), fontsize=12)
    return save_tight(fig, path)


def _phase_table(phases: list[Phase]) -> str:
    rows = ["| phase | steps | KL | IE (mean over layers ≥ 1) | what happens |", "|---|---|---|---|---|"]
    for i, p in enumerate(phases, 1):
        rows.append(f"| {i} | {p.start}–{p.end} | {p.kl_values[0]:.3f} → {p.kl_values[1]:.3f} | "
                    f"{p.ie_values[0]:.3f} → {p.ie_values[1]:.3f} | {p.description()} |")
    return "\n".join(rows)


@register_section
def geometry_section(run: Run, out: Path) -> str | None:
    """IE per layer and KL to the unigram over training, split into phases at their critical points."""
    rows = geometry_frame(run)
    if rows.empty:
        return None
    ie = per_layer_table(metric_rows(rows, "geometry", "interaction_energy"))
    kl = {m: metric_rows(rows, "geometry", m).set_index("step")["value"] for m in KL_METRICS
          if len(metric_rows(rows, "geometry", m))}
    source = rows["source"].iloc[0]
    intro = (f"Measured by the `geometry` probe ({'on the fixed probe batch at each checkpoint' if source == 'checkpoint' else 'live, on training batches'}; "
             f"{ie.shape[0]} steps). Interaction energy IE = (1/n²) Σ_i Σ_j exp(β·cos(x_i, x_j)) over a sequence's positions "
             "lies in [1/e, e] for β = 1: e when every position points the same way. Stream 0 is the embeddings, ℓ the stream "
             "after block ℓ−1, the last one after the final norm.")
    if "kl_unigram" not in kl or len(ie) < 2:
        figure = plot_geometry(ie, kl, [], out / "geometry.png")
        note = "" if "kl_unigram" in kl else " No `kl_unigram` was measured, so no phases are given."
        return "## Residual-stream geometry\n\n" + intro + note + "\n\n" + figures_section({"geometry": figure}, {"geometry": "IE per stream and KL to the unigram against step."})
    steps = ie.index.intersection(kl["kl_unigram"].index)
    phases, points = geometry_phases(steps.to_numpy(), mean_ie(ie).loc[steps].to_numpy(), kl["kl_unigram"].loc[steps].to_numpy())
    boundaries = sorted({*points["ie"], *points["kl"]})
    figure = plot_geometry(ie, kl, boundaries, out / "geometry.png")
    caption = ("IE per residual stream (top) and KL of the model's predictions to the run's unigram distribution (the token "
               "counts in `unigram.json`) (bottom) against step; dotted lines: critical points of the smoothed IE (mean over streams ≥ 1) and "
               "KL curves, which bound the phases below.")
    lines = [f"- {p.description()}: steps {p.start}–{p.end} (effect {p.effect:.2f} of the curve's range, {p.checkpoints} checkpoints)"
             for p in phases]
    critical = (f"Critical points: KL at steps {', '.join(map(str, points['kl'])) or 'none'}; "
                f"IE at steps {', '.join(map(str, points['ie'])) or 'none'}.")
    floors = (f"A phase spans at least {MIN_PHASE_CHECKPOINTS} checkpoints and moves KL or IE by at least "
              f"{MIN_PHASE_EFFECT:.0%} of that curve's range (its effect); shorter or smaller stretches join a neighbour "
              "(see docs/concepts/claims.md).")
    listed = ("\n".join(lines) + "\n\n" + _phase_table(phases)) if phases else (
        "No phases: over these checkpoints neither curve makes a move that passes the floors.")
    return ("## Residual-stream geometry\n\n" + intro + "\n\n"
            + figures_section({"geometry": figure}, {"geometry": caption})
            + "\n\n### Phases\n\n" + critical + " " + floors + "\n\n" + listed)
