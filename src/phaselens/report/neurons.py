"""Report section: neuron sparsity against training step (rows of the `neurons` probe)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from phaselens.report import register_section
from phaselens.report.plotting import save_tight
from phaselens.run import Run

PANELS = {
    "firing_rate_mean": "mean firing rate",
    "frac_rare": "share of rare neurons (<1% of tokens)",
    "frac_dead": "share of dead neurons",
    "selectivity_median": "median selectivity (max/mean)",
}


def sparsity_rows(run: Run) -> pd.DataFrame:
    return run.metrics(probe="neurons", prefer="checkpoint")  # the fixed held-out text, where it was measured


def plot_sparsity(rows: pd.DataFrame, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.3 * len(PANELS), 3.2))
    for ax, (metric, title) in zip(axes, PANELS.items()):
        frame = rows[rows["metric"] == metric]
        for layer, series in frame.groupby("layer"):
            series = series.sort_values("step")
            ax.plot(series["step"], series["value"], label=f"layer {int(layer)}", lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if metric == "selectivity_median":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    save_tight(fig, path)
    return path


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


@register_section
def neurons_section(run: Run, out: Path) -> str | None:
    rows = sparsity_rows(run)
    if rows.empty:
        return None
    figure = plot_sparsity(rows, out / "neuron_sparsity.png")
    last = rows[rows["step"] == rows["step"].max()]
    table = ["| layer | mean firing rate | rare (<1%) | dead | median selectivity |", "|---|---|---|---|---|"]
    for layer, frame in last.groupby("layer"):
        value = dict(zip(frame["metric"], frame["value"]))
        table.append(f"| {int(layer)} | {_pct(value.get('firing_rate_mean', math.nan))} | {_pct(value.get('frac_rare', math.nan))} "
                     f"| {_pct(value.get('frac_dead', math.nan))} | {value.get('selectivity_median', math.nan):.1f} |")
    text = (f"## Sparse neurons over training\n\nThe `neurons` probe ({rows['source'].iloc[0]} values: the fixed probe batch of held-out text at each checkpoint); a neuron fires "
            f"when its activation is > 0. At step {int(last['step'].iloc[0])}:\n\n" + "\n".join(table)
            + f"\n\n![neuron sparsity]({figure.name})\n\n*Per layer over training: mean firing rate, share of rare and dead "
            "neurons, median selectivity (log scale).*")
    detailed = run.dir.report / "neurons" / "neurons.md"
    text += ("\n\nPer-neuron statistics on held-out text and the strongest contexts: [neurons/neurons.md](neurons/neurons.md)."
             if detailed.is_file() else f"\n\nFor per-neuron statistics on held-out text and top contexts: `phaselens neurons {run.path}`.")
    return text
