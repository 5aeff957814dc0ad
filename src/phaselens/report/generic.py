"""The report of a run whose task registered no report section: its loss, and a figure per probe.

What every run has, shown without knowing what the study looks for: the final train and eval
losses, and each probe's metrics against step (one panel per metric; per-head metrics as one line
per head, averaged over heads per layer when there are many). Transitions are in the shared part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from phaselens.report import StudyReport, figures_section
from phaselens.report.plotting import Figure, plt, save_tight
from phaselens.run import Run
from phaselens.signals.sources import prefer_source

MAX_LINES = 12  # more series than this in a panel: per-head values are averaged over heads per layer
MAX_PANELS = 8


def probe_rows(metrics: pd.DataFrame, probe: str) -> pd.DataFrame:
    """The rows of `probe`, each series from one source: the one with the most measured steps."""
    return prefer_source(metrics[metrics["probe"] == probe], "densest")


def _lines(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Series by label: 'model', 'layer ℓ' or 'LℓHh' (per-head series averaged per layer when there are many)."""
    if frame["layer"].isna().all():
        return {"model": frame.groupby("step")["value"].mean()}
    has_heads = frame["head"].notna()
    if has_heads.any() and frame[has_heads].groupby(["layer", "head"]).ngroups > MAX_LINES:
        frame = frame[has_heads].assign(head=pd.NA)
    keys = ["layer", "head"] if frame["head"].notna().any() else ["layer"]
    out = {}
    for key, series in frame.dropna(subset=keys).groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        label = f"L{int(key[0])}H{int(key[1])}" if len(key) == 2 else f"layer {int(key[0])}"
        out[label] = series.groupby("step")["value"].mean()
    return dict(list(out.items())[:MAX_LINES])


def plot_probe(rows: pd.DataFrame, probe: str, path: Path) -> Figure:
    """Every metric of one probe against step, one panel each."""
    metrics = sorted(rows["metric"].unique())[:MAX_PANELS]
    columns = min(4, len(metrics))
    n_rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(3.6 * columns, 2.9 * n_rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        lines = _lines(rows[rows["metric"] == metric])
        colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, max(2, len(lines))))
        for color, (label, series) in zip(colors, lines.items()):
            ax.plot(series.index, series.values, color=color, lw=1.2, marker="o" if len(series) < 30 else None, ms=2.5, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if 1 < len(lines) <= 8:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"probe `{probe}` ({rows['source'].iloc[0]} values)", fontsize=11)
    return save_tight(fig, path)


def _loss_text(metrics: pd.DataFrame) -> str:
    parts = []
    for metric in ("train", "eval"):
        rows = metrics[(metrics["probe"] == "loss") & (metrics["metric"] == metric)].sort_values("step")
        if len(rows):
            parts.append(f"{metric} loss {rows['value'].iloc[-1]:.3f} at step {int(rows['step'].iloc[-1])}")
    if not parts:  # a run of the user's own loop: the loss probe's value on the measured batches
        rows = metrics[(metrics["probe"] == "loss") & (metrics["metric"] == "all")].sort_values("step")
        if len(rows):
            parts.append(f"loss on the measured batches {rows['value'].iloc[-1]:.3f} at step {int(rows['step'].iloc[-1])}")
    return ("Final " + "; ".join(parts) + ".") if parts else "No loss was recorded."


def generic_study(run: Run, out: Path) -> StudyReport:
    """The report part of a run of a task without a registered report section."""
    metrics = run.metrics()
    steps = int(metrics["step"].max()) if len(metrics) else 0
    text = (f"Run `{run.path}` ({run.status}): task `{run.task}`, {steps} steps. No report section is registered for "
            f"this task, so this is the generic report: the loss, the detected transitions, and every probe's metrics "
            f"against step.\n\n" + _loss_text(metrics))
    figures, captions = {}, {}
    for probe in sorted(metrics["probe"].unique()) if len(metrics) else []:
        name = f"probe_{probe}"
        figures[name] = plot_probe(probe_rows(metrics, probe), probe, out / f"{name}.png")
        captions[name] = (f"Every metric of the `{probe}` probe against step (per-layer and per-head series as "
                          f"separate lines; with more than {MAX_LINES} heads, their mean per layer).")
    return StudyReport(summary=[text], figures=figures_section(figures, captions))
