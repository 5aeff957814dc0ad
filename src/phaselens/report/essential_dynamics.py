"""The report's essential-dynamics section: the PCA trajectory of the outputs across checkpoints (PC1–PC2 and
PC2–PC3, coloured by step), its turning strength against the random-walk null, and the turning points beside
the LLC's stage boundaries and the copy-loss transitions (any run the `essential_dynamics` probe measured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from phaselens.analysis.essential_dynamics import current_trajectory, nearest_distances
from phaselens.analysis.stages import run_stages
from phaselens.errors import PhaselensError
from phaselens.report import figures_section, register_section
from phaselens.report.llc import headline_transitions
from phaselens.report.plotting import TRANSITION_COLOR, Figure, plt, save_figure, save_tight
from phaselens.run import Run
from phaselens.store.essential_dynamics import PROBE, Trajectory

STAGE_COLOR = "#2060c0"
TURN_COLOR = "#e08000"


def nearest_checkpoints(steps: list[int], marks: list[int]) -> list[int]:
    """Index of the checkpoint nearest to each marked step (a transition's step lies between checkpoints)."""
    order = np.asarray(steps)
    return sorted({int(np.argmin(np.abs(order - m))) for m in marks})


def plot_trajectory(trajectory: Trajectory, transitions: list[int], boundaries: list[int], path: Path) -> Figure:
    """PC1–PC2 and PC2–PC3 of the trajectory, points coloured by step; transitions ringed red, LLC stage boundaries
    boxed blue, turning points beyond the null starred."""
    coords = np.asarray(trajectory.coords)  # (n, 3)
    steps = np.asarray(trajectory.steps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    ringed = nearest_checkpoints(trajectory.steps, transitions)
    boxed = nearest_checkpoints(trajectory.steps, boundaries)
    starred = [trajectory.steps.index(s) for s in trajectory.turning_points]
    for ax, (a, b) in zip(axes, ((0, 1), (1, 2))):
        ax.plot(coords[:, a], coords[:, b], color="#999999", lw=0.8, zorder=1)
        points = ax.scatter(coords[:, a], coords[:, b], c=steps, cmap="viridis", s=22, zorder=2)
        if ringed:
            ax.scatter(coords[ringed, a], coords[ringed, b], s=110, facecolors="none", edgecolors=TRANSITION_COLOR,
                       lw=1.5, zorder=3, label="nearest a copy-loss transition")
        if boxed:
            ax.scatter(coords[boxed, a], coords[boxed, b], s=90, marker="s", facecolors="none", edgecolors=STAGE_COLOR,
                       lw=1.5, zorder=3, label="LLC stage boundary")
        if starred:
            ax.scatter(coords[starred, a], coords[starred, b], s=160, marker="*", color=TURN_COLOR, edgecolors="black",
                       lw=0.5, zorder=4, label="turning point beyond the null")
        ax.set_xlabel(f"PC{a + 1} ({100 * trajectory.explained[a]:.0f}% of variance)" if a < len(trajectory.explained) else f"PC{a + 1}")
        ax.set_ylabel(f"PC{b + 1} ({100 * trajectory.explained[b]:.0f}% of variance)" if b < len(trajectory.explained) else f"PC{b + 1}")
        ax.grid(alpha=0.25)
    fig.colorbar(points, ax=axes, label="step", pad=0.01)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8, loc="best")
    save_figure(fig, path)
    return Figure(path)


def plot_turning(trajectory: Trajectory, transitions: list[int], boundaries: list[int], path: Path) -> Figure:
    """Turning strength per checkpoint against the null's threshold, with the transitions and stage boundaries as lines."""
    steps = np.asarray(trajectory.steps, dtype=float)
    turning = np.array([np.nan if v is None else v for v in trajectory.turning], dtype=float)
    threshold = np.array([np.nan if v is None else v for v in trajectory.threshold], dtype=float)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(steps, turning, color="#303030", marker="o", ms=3, lw=1.2, label="turning strength")
    ax.plot(steps, threshold, color="#888888", ls=":", lw=1.4, label=f"random-walk null ({100 * trajectory.null.get('quantile', 0):.2f}% quantile)")
    for s in trajectory.turning_points:
        ax.plot([s], [turning[trajectory.steps.index(s)]], marker="*", ms=14, color=TURN_COLOR, mec="black", mew=0.5, ls="")
    for i, s in enumerate(transitions):
        ax.axvline(s, color=TRANSITION_COLOR, ls="--", lw=1, label="copy-loss transition" if i == 0 else None)
    for i, s in enumerate(boundaries):
        ax.axvline(s, color=STAGE_COLOR, ls="-.", lw=1, label="LLC stage boundary" if i == 0 else None)
    ax.set_ylim(0, 185)
    ax.set_xlabel("step")
    ax.set_ylabel("turning angle (degrees)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.25)
    return save_tight(fig, path)


def variance_text(trajectory: Trajectory) -> str:
    """The explained-variance fractions of PC1–PC3 against the random-walk null, as a sentence and a table."""
    shown = min(3, len(trajectory.explained))
    rows = ["| component | explained | random walk 6/(π²k²) | walk with this run's step lengths |", "|---|---|---|---|"]
    for k in range(shown):
        rows.append(f"| PC{k + 1} | {trajectory.explained[k]:.3f} | {trajectory.null_explained[k]:.3f} | "
                    f"{trajectory.matched_null_explained[k]:.3f} |")
    above = [k + 1 for k in range(shown) if trajectory.explained[k] > trajectory.matched_null_explained[k]]
    sentence = ("A random walk already concentrates its variance in the first components (and gives smooth, "
                "Lissajous-like PCA curves), so these fractions alone say nothing about stages. "
                + (f"Here PC{', PC'.join(map(str, above))} explain{'s' if len(above) == 1 else ''} more than the walk with "
                   "this run's step lengths." if above else "No component explains more than the walk with this run's step lengths."))
    return sentence + "\n\n" + "\n".join(rows)


def comparison_table(trajectory: Trajectory, boundaries: list[int], transitions: list[int]) -> str:
    """Each turning point with the nearest LLC stage boundary and copy-loss transition, and each boundary with the
    nearest turning point, distances in checkpoints."""
    steps = trajectory.steps
    rows = ["| series | step | nearest turning point | distance (checkpoints) |", "|---|---|---|---|"]
    for name, marks in (("LLC stage boundary", boundaries), ("copy-loss transition", transitions)):
        for point, nearest, distance in nearest_distances(marks, trajectory.turning_points, steps):
            rows.append(f"| {name} | {point} | {'–' if nearest is None else nearest} | {'–' if distance is None else distance} |")
    return "\n".join(rows)


@register_section
def essential_dynamics_section(run: Run, out: Path) -> str | None:
    """The trajectory figures, the variance against the null, and the turning points beside the stages."""
    if run.metrics(probe=PROBE).empty:
        return None
    heading = "## Essential dynamics: the outputs' PCA trajectory across checkpoints\n\n"
    try:
        trajectory, stored = current_trajectory(run)
    except PhaselensError as exc:  # vectors measured with other options, or unreadable: say so, draw the rest
        return heading + f"No trajectory: {exc}"
    if trajectory is None:
        return heading + "The `essential_dynamics` probe has measured fewer than three checkpoints: no trajectory yet."
    metrics = run.metrics()
    transitions_frame = run.transitions()
    _, points = run_stages(metrics, transitions_frame)
    boundaries = list(points.get("llc", []))
    marks = headline_transitions(transitions_frame) if len(transitions_frame) else pd.DataFrame(columns=["step"])
    transitions = sorted(int(s) for s in marks["step"])
    figures = {
        "essential_dynamics": plot_trajectory(trajectory, transitions, boundaries, out / "essential_dynamics.png"),
        "essential_turning": plot_turning(trajectory, transitions, boundaries, out / "essential_turning.png"),
    }
    captions = {
        "essential_dynamics": "PCA of the outputs across checkpoints: PC1–PC2 (left), PC2–PC3 (right), points coloured by "
                              "step; red rings: the checkpoint nearest each copy-loss transition; blue squares: LLC stage "
                              "boundaries; stars: turning points beyond the random-walk null.",
        "essential_turning": "Turning strength (the angle between the trajectory's steps into and out of a checkpoint, in "
                             "PC1–PC3) against the null's threshold (dotted); only points above it are read as turns.",
    }
    null = trajectory.null
    what = ("log p of the correct next token at each of the probe batch's predictions" if trajectory.output == "logprob"
            else "the log-probabilities of a fixed subset of tokens at a fixed subset of positions")
    intro = (f"Each checkpoint's output vector ({what}, D = {trajectory.dimension}) at {len(trajectory.steps)} checkpoints, "
             "centred over checkpoints and decomposed by PCA. "
             + ("" if stored else "(Computed for this report from the stored vectors; `phaselens probe RUN --probes "
                                  "essential_dynamics` stores its rows.) ")
             + f"The null: {null.get('walks')} seeded random walks with this trajectory's length and step lengths in "
               f"random directions (dimension {null.get('walk_dimension')}), put through the same PCA; a checkpoint is a "
               f"turning point when its turning angle exceeds the null's {100 * null.get('quantile', 0):.2f}% quantile there "
               f"(a {100 * null.get('alpha', 0):.0f}% chance that a random walk shows one anywhere).")
    found = (f"Turning points beyond the null: step{'s' if len(trajectory.turning_points) > 1 else ''} "
             f"{', '.join(map(str, trajectory.turning_points))}." if trajectory.turning_points else
             "No turning point exceeds the null: the trajectory's turns are what a random walk of these step lengths shows, "
             "and none is read as a stage boundary.")
    llc_note = ("" if boundaries else "The `llc` probe has not measured this run, so there are no LLC stage boundaries "
                "to compare with; the copy-loss transitions stand in. ")
    return (heading + intro + "\n\n" + variance_text(trajectory) + "\n\n" + figures_section(figures, captions)
            + "\n\n### Turning points beside the stages\n\n" + found + " " + llc_note
            + "Distances count checkpoints between a boundary and the nearest turning point.\n\n"
            + comparison_table(trajectory, boundaries, transitions))
