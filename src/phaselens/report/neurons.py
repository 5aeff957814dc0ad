"""Report section: neuron sparsity against training step (rows of the `neurons` probe)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from phaselens.report import register_section
from phaselens.report.plotting import save_tight
from phaselens.run import Run
from phaselens.store.neuron_artifact import read_neuron_artifact

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


def last_summaries(run: Run, last: pd.DataFrame) -> tuple[dict[int, dict], str]:
    """Per layer, the summary at the last step, and the sample it was read on: the `phaselens neurons` scan where one
    measured that step (many more tokens than the probe batch, so fewer neurons look dead), else the probe's values.
    Both come from the same formulas (`probes.neurons.NeuronStats.summary`), so a step has one dead fraction."""
    step = int(last["step"].iloc[0])
    path = run.dir.artifacts / "neurons" / f"step_{step:08d}.json"
    if path.is_file():
        scan = read_neuron_artifact(path)
        return ({layer.layer: layer.summary for layer in scan.layers},
                f"from `phaselens neurons` ({scan.tokens:,} tokens of {scan.source}; the curves above read the probe batch)")
    return ({int(layer): dict(zip(frame["metric"], frame["value"])) for layer, frame in last.groupby("layer")},
            "on the probe batch")


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


@register_section
def neurons_section(run: Run, out: Path) -> str | None:
    rows = sparsity_rows(run)
    if rows.empty:
        return None
    figure = plot_sparsity(rows, out / "neuron_sparsity.png")
    last = rows[rows["step"] == rows["step"].max()]
    step = int(last["step"].iloc[0])
    summaries, sample = last_summaries(run, last)
    table = ["| layer | mean firing rate | rare (<1%) | dead | median selectivity |", "|---|---|---|---|---|"]
    for layer, value in summaries.items():
        table.append(f"| {layer} | {_pct(value.get('firing_rate_mean', math.nan))} | {_pct(value.get('frac_rare', math.nan))} "
                     f"| {_pct(value.get('frac_dead', math.nan))} | {value.get('selectivity_median', math.nan):.1f} |")
    text = (f"## Sparse neurons over training\n\nThe `neurons` probe ({rows['source'].iloc[0]} values: the fixed probe batch of held-out text at each checkpoint); a neuron fires "
            f"when its activation is > 0, and is dead when it fires on no token of the sample (`probes.neurons.dead_fraction`). "
            f"At step {step}, {sample}:\n\n" + "\n".join(table)
            + f"\n\n![neuron sparsity]({figure.name})\n\n*Per layer over training: mean firing rate, share of rare and dead "
            "neurons, median selectivity (log scale).*")
    detailed = run.dir.report / "neurons" / "neurons.md"
    text += ("\n\nPer-neuron statistics on held-out text and the strongest contexts: [neurons/neurons.md](neurons/neurons.md)."
             if detailed.is_file() else f"\n\nFor per-neuron statistics on held-out text and top contexts: `phaselens neurons {run.path}`.")
    return text
