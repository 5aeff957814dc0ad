"""The report's `llc` section: the LLC curve over checkpoints, its developmental stages, the SGLD
traces and every diagnostic warning (any run the `llc` probe measured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from phaselens.analysis.head_clusters import HeadClusters, cluster_heads, head_roles
from phaselens.analysis.stages import Stage, head_llc_curves, llc_curve, run_stages, stage_loss
from phaselens.report import figures_section, register_section
from phaselens.report.plotting import TRANSITION_COLOR, Figure, plt, save_tight
from phaselens.run import Run
from phaselens.store.llc import LLCArtifact, read_llc_artifacts

STAGE_COLORS = ("#e8eef8", "#f6ecdf")  # alternating bands
TRACE_PANELS = 4  # checkpoints whose traces are drawn (warned ones first, then spread over training)


def headline_transitions(transitions: pd.DataFrame) -> pd.DataFrame:
    """The copy-loss transitions (the induction story) when there are any, else every loss transition."""
    copy = transitions[(transitions["probe"] == "loss") & (transitions["metric"] == "copy")]
    return copy if len(copy) else transitions[transitions["probe"] == "loss"]


def plot_llc(llc: pd.Series, std: pd.Series, loss: pd.Series | None, stages: list[Stage], marks: pd.DataFrame, path: Path) -> Figure:
    """λ̂ ± its standard error against step over stage bands, with the loss on a second axis and the headline transitions marked."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, stage in enumerate(stages):
        ax.axvspan(stage.start, stage.end, color=STAGE_COLORS[i % 2], lw=0)
        ax.text((stage.start + stage.end) / 2, 1.0, f"stage {stage.index}", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)
    steps = llc.index.to_numpy()
    ax.fill_between(steps, (llc - std).to_numpy(), (llc + std).to_numpy(), color="#3060b0", alpha=0.25, lw=0)
    ax.plot(steps, llc.to_numpy(), color="#3060b0", marker="o", ms=3, lw=1.6, label="λ̂ (LLC) ± standard error over chains")
    ax.set_xlabel("step")
    ax.set_ylabel("local learning coefficient λ̂")
    for _, t in marks.iterrows():
        ax.axvline(t["step"], color=TRANSITION_COLOR, ls="--", lw=1)
    handles = ax.get_legend_handles_labels()
    if loss is not None:
        twin = ax.twinx()
        twin.plot(loss.index, loss.to_numpy(), color="#555555", lw=0.8, alpha=0.8, label="loss")
        twin.set_ylabel("loss (nats)")
        extra = twin.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    if len(marks):
        from matplotlib.lines import Line2D

        handles = (handles[0] + [Line2D([], [], color=TRANSITION_COLOR, ls="--")], handles[1] + ["copy-loss transitions"])
    ax.legend(*handles, fontsize=8, loc="center right")
    ax.grid(alpha=0.25)
    return save_tight(fig, path)


def trace_steps(artifacts: list[LLCArtifact], panels: int = TRACE_PANELS) -> list[LLCArtifact]:
    """The checkpoints whose traces are drawn: those with warnings first, then spread evenly over training."""
    warned = [a for a in artifacts if a.warnings][:panels]
    rest = [a for a in artifacts if not a.warnings]
    picks = [rest[int(round(i))] for i in np.linspace(0, len(rest) - 1, min(len(rest), panels - len(warned)))] if rest else []
    return sorted({a.step: a for a in warned + picks}.values(), key=lambda a: a.step)


def plot_traces(artifacts: list[LLCArtifact], path: Path, title: str = "") -> Figure:
    """Each chain's minibatch loss over its SGLD steps, one panel per checkpoint, burn-in shaded, L_n(w*) dotted."""
    if not artifacts:
        return Figure(None, ["llc traces"])
    cols = min(4, len(artifacts))
    rows = -(-len(artifacts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, a in zip(axes.flat, artifacts):
        traces = np.array([[np.nan if v is None else v for v in row] for row in a.traces], dtype=float)  # (C, steps)
        ax.axvspan(0, a.burnin, color="#eeeeee", lw=0)
        for chain in traces:
            ax.plot(chain, lw=0.7)
        ax.axhline(a.init_loss, color="black", ls=":", lw=1)
        label = a.options.get("label") or f"step {a.step}"
        ax.set_title(f"{label}: λ̂ = {a.llc:.1f} ± {a.llc_std:.1f}" + (" ⚠" if a.warnings else ""), fontsize=9,
                     color=TRANSITION_COLOR if a.warnings else "black")
        ax.set_xlabel("SGLD step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(artifacts):]:
        ax.axis("off")
    axes[0][0].set_ylabel("minibatch loss L_m(w_t)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_tight(fig, path)


def stage_table(stages: list[Stage]) -> str:
    rows = ["| stage | steps | λ̂ (smoothed) | loss (smoothed) | transitions inside (strongest first) |", "|---|---|---|---|---|"]
    for s in stages:
        loss = f"{s.loss[0]:.3f} → {s.loss[1]:.3f}" if s.loss else "–"
        rows.append(f"| {s.index} | {s.start}–{s.end} | {s.llc[0]:.1f} → {s.llc[1]:.1f} ({s.llc_trend}) | {loss} | "
                    f"{'; '.join(s.transitions) or '–'} |")
    return "\n".join(rows)


def llc_warnings(artifacts: list[LLCArtifact]) -> list[str]:
    """One line per checkpoint whose chains (the whole model's or a component's) raised a diagnostic."""
    return [f"step {a.step}: " + "; ".join(a.all_warnings) for a in artifacts if a.all_warnings]


SEED_NOTE = ("Every checkpoint's chains use the same seeds (the same minibatches and noise), so the errors of neighbouring "
             "checkpoints are correlated: the curve's *shape* (where λ̂ rises or falls) is more precise than its *level*, "
             "which can sit off by more than the standard errors show. `--probe-option llc.seed_per_step=true` draws "
             "independent seeds at every checkpoint, whose scatter shows the level's uncertainty.")


def plot_head_llc(curves: pd.DataFrame, clusters: HeadClusters | None, marks: pd.DataFrame, path: Path) -> Figure:
    """Each head's weight-refined λ̂ against step (log axis), coloured by its k-means cluster."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name in curves.columns:
        cluster = clusters.labels[clusters.heads.index(name)] if clusters and name in clusters.heads else 0
        role = clusters.roles.get(name, "") if clusters else ""
        ax.plot(curves.index.to_numpy() + 1, curves[name].to_numpy(), marker="o", ms=2.5, lw=1.4,
                color=colours[cluster % len(colours)], label=f"{name}" + (f" ({role})" if role else "") + f", cluster {cluster + 1}")
    for _, t in marks.iterrows():
        ax.axvline(t["step"] + 1, color=TRANSITION_COLOR, ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("step + 1 (log)")
    ax.set_ylabel("weight-refined λ̂ of the head")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.25)
    return save_tight(fig, path)


def plot_dendrogram(clusters: HeadClusters, path: Path) -> Figure:
    """The average-linkage tree of the heads' standardized curves (height: mean distance between merged groups)."""
    n = len(clusters.heads)
    groups = {i: [i] for i in range(n)}
    for j, (a, b, _, _) in enumerate(clusters.merges):
        groups[n + j] = groups.pop(a) + groups.pop(b)
    order = groups[max(groups)]  # leaves in merge order, so that branches do not cross
    position = {leaf: float(i) for i, leaf in enumerate(order)}
    height = {i: 0.0 for i in range(n)}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for j, (a, b, h, _) in enumerate(clusters.merges):
        for child in (a, b):
            ax.plot([position[child]] * 2, [height[child], h], color="#3060b0", lw=1.4)
        ax.plot([position[a], position[b]], [h, h], color="#3060b0", lw=1.4)
        position[n + j], height[n + j] = (position[a] + position[b]) / 2, h
    ax.set_xticks(range(n))
    ax.set_xticklabels([clusters.heads[i] + (f"\n{clusters.roles.get(clusters.heads[i])}" if clusters.roles.get(clusters.heads[i]) else "")
                        for i in order], fontsize=8)
    ax.set_ylabel("distance (standardized curves)")
    ax.set_title("heads by the shape of their rLLC curves (average linkage)", fontsize=9)
    return save_tight(fig, path)


def rise_step(curve: pd.Series) -> int:
    """The checkpoint after which a curve rises most (its largest step-to-step increase)."""
    values = curve.dropna()
    jumps = np.diff(values.to_numpy())
    return int(values.index[int(np.argmax(jumps)) + 1]) if len(jumps) else int(values.index[0])


def stage_of(step: int, stages: list[Stage]) -> int | None:
    return next((s.index for s in stages if s.start <= step <= s.end), None)


def cluster_text(curves: pd.DataFrame, clusters: HeadClusters, stages: list[Stage]) -> str:
    """Which heads cluster together, their head-score roles, and the stage in which each cluster's curve rises most."""
    lines = []
    how = (f"k-means on the standardized log-step curves, k = {clusters.k} by silhouette ({clusters.silhouette:.2f})"
           if clusters.k > 1 else "k-means found no grouping with a silhouette of 0.25 or more: one cluster")
    lines.append(f"Heads grouped by the shape of their rLLC curves ({how}):")
    for i, group in enumerate(clusters.groups(), 1):
        roles = [f"{h} ({clusters.roles[h]})" if clusters.roles.get(h) else f"{h} (no head-score role)" for h in group]
        step = rise_step(curves[group].mean(axis=1))
        where = stage_of(step, stages)
        lines.append(f"- cluster {i}: {', '.join(roles)}; their mean rLLC rises most after step {step}"
                     + (f" (stage {where})" if where else ""))
    by_role: dict[str, set[int]] = {}
    for h, label in zip(clusters.heads, clusters.labels):
        if clusters.roles.get(h):
            by_role.setdefault(clusters.roles[h], set()).add(label)
    split = [r for r, labels in by_role.items() if len(labels) > 1]
    together = [r for r, labels in by_role.items()
                if len(labels) == 1 and sum(1 for h in clusters.heads if clusters.roles.get(h) == r) > 1]
    if together:
        lines.append(f"Heads of one role share a cluster: {', '.join(together)}.")
    if split:
        lines.append(f"Heads of one role fall in different clusters: {', '.join(split)}.")
    return "\n".join(lines)


def head_section(metrics: pd.DataFrame, stages: list[Stage], marks: pd.DataFrame, out: Path) -> str:
    """The per-head rLLC curves, their clusters and dendrogram (empty without `components=heads`)."""
    curves = head_llc_curves(metrics)
    if curves.empty:
        return ""
    clusters = cluster_heads(curves, head_roles(metrics))
    figures = {"llc_heads": plot_head_llc(curves, clusters, marks, out / "llc_heads.png")}
    captions = {"llc_heads": "Weight-refined λ̂ of each head (SGLD moving only that head's weights, every other weight at "
                             "the checkpoint's) against step on a log axis, coloured by cluster; dashed: the copy-loss transitions."}
    text = ""
    if clusters is not None:
        figures["llc_dendrogram"] = plot_dendrogram(clusters, out / "llc_dendrogram.png")
        captions["llc_dendrogram"] = "Average-linkage tree of the heads' standardized rLLC curves."
        text = cluster_text(curves, clusters, stages) + "\n\n"
    return "\n\n### Heads\n\n" + text + figures_section(figures, captions)


@register_section
def llc_section(run: Run, out: Path) -> str | None:
    """The LLC curve with its stages, the stage table, the chains' traces and the diagnostics."""
    metrics = run.metrics()
    llc, std = llc_curve(metrics)
    if llc.empty:
        return None
    artifacts = read_llc_artifacts(run.path)
    transitions = run.transitions()
    loss = stage_loss(metrics)
    stages, points = run_stages(metrics, transitions)
    marks = headline_transitions(transitions)
    options = artifacts[-1].options if artifacts else {}
    figures = {
        "llc": plot_llc(llc, std, loss, stages, marks, out / "llc.png"),
        "llc_traces": plot_traces(trace_steps(artifacts), out / "llc_traces.png"),
    }
    captions = {
        "llc": "Local learning coefficient λ̂ at every checkpoint (band: ± standard error over chains), over the developmental stages "
               "(shaded); grey: the loss; dashed: the copy-loss transitions.",
        "llc_traces": "SGLD chains' minibatch loss at a few checkpoints (grey: burn-in; dotted: L_n(w*)); a healthy trace rises "
                      "from L_n(w*) and levels off within the burn-in. ⚠ marks a checkpoint with a warning.",
    }
    settings = ", ".join(f"{k}={v}" for k, v in options.items() if v is not None)
    intro = (f"Measured by the `llc` probe on {len(llc)} checkpoints ({settings}). λ̂ = nβ·(mean over chains and draws of "
             "L_m(w_t) − L_n(w*)), SGLD chains localized at each checkpoint's weights, on a fixed sample of the training data"
             + (f", the loss counted only at the `{options['positions']}` positions (data-refined)" if options.get("positions") else "")
             + ". " + SEED_NOTE)
    warned = llc_warnings(artifacts)
    warning_text = ("\n\n**Warnings.** The SGLD diagnostics flagged " + f"{len(warned)} checkpoint(s); their λ̂ is not to be trusted "
                    "as is (calibrate with `phaselens llc-calibrate RUN --step S`):\n\n" + "\n".join(f"- {w}" for w in warned)
                    if warned else "\n\nNo SGLD diagnostic fired: no chain diverged or left the basin (mean loss above the uniform guess "
                                         "log(vocab)), every λ̂ > 0, every trace settled after burn-in.")
    critical = (f"Critical points: LLC at steps {', '.join(map(str, points['llc'])) or 'none'}; "
                f"loss at steps {', '.join(map(str, points['loss'])) or 'none'}.")
    return ("## Local learning coefficient and developmental stages\n\n" + intro + warning_text + "\n\n"
            + figures_section(figures, captions) + "\n\n### Stages\n\n" + critical + "\n\n" + stage_table(stages)
            + head_section(metrics, stages, marks, out))


def warning_kind(warning: str) -> str:
    """A diagnostic's short name for a figure panel: diverged, λ̂ < 0 or not settled."""
    if "diverged" in warning:
        return "diverged"
    return "λ̂ < 0" if "< 0" in warning else "not settled"


def plot_calibration(calibration, path: Path) -> Figure:
    """The `llc-calibrate` grid: one panel per (ε, γ) with every chain's trace; rows ε, columns γ; the recommendation framed."""
    points = calibration.points
    epsilons = sorted({p.epsilon for p in points})
    gammas = sorted({p.gamma for p in points})
    fig, axes = plt.subplots(len(epsilons), len(gammas), figsize=(max(6.0, 3.0 * len(gammas)), 2.4 * len(epsilons) + 0.6),
                             squeeze=False, sharex=True)
    for p in points:
        ax = axes[epsilons.index(p.epsilon)][gammas.index(p.gamma)]
        traces = np.array([[np.nan if v is None else v for v in row] for row in p.traces], dtype=float)
        ax.axvspan(0, p.burnin, color="#eeeeee", lw=0)
        finite = traces[np.isfinite(traces)]
        for chain in traces:
            ax.plot(chain, lw=0.7)
        ax.axhline(p.init_loss, color="black", ls=":", lw=1)
        if len(finite):  # a diverged chain would flatten the others: clip the axis to the healthy range
            top = min(float(finite.max()), 3 * p.init_loss + 1)
            ax.set_ylim(min(float(finite.min()), p.init_loss) - 0.02, top + 0.02)
        state = "ok" if p.healthy else "⚠ " + ", ".join(warning_kind(w) for w in p.warnings)
        ax.set_title(f"ε={p.epsilon:g} γ={p.gamma:g}: λ̂={p.llc:.1f}\n{state}", fontsize=8,
                     color="black" if p.healthy else TRANSITION_COLOR)
        ax.tick_params(labelsize=7)
        if p is calibration.recommended:
            for spine in ax.spines.values():
                spine.set_edgecolor("#20a040")
                spine.set_linewidth(2.5)
    for ax in axes[-1]:
        ax.set_xlabel("SGLD step", fontsize=8)
    for row, epsilon in zip(axes, epsilons):
        row[0].set_ylabel(f"ε={epsilon:g}\nL_m(w_t)", fontsize=8)
    fig.suptitle(f"llc-calibrate, step {calibration.step}\ngrey: burn-in; dotted: L_n(w*); green frame: recommended", fontsize=10)
    return save_tight(fig, path)
