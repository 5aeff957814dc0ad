"""The report part of the grokking study: the accuracy lag, the three phases, the key frequencies, one timeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from phaselens.analysis.components import ablation_steps, ablations_at, node_label
from phaselens.analysis.grokking import TEST_SOLVED, GrokkingSummary, key_frequency_artifact, series, summarize_grokking
from phaselens.report import StudyReport, figures_section, register_study
from phaselens.report.plotting import Figure, save_figure
from phaselens.run import Run

PHASE_COLORS = {"memorisation": "#d9d9d9", "circuit formation": "#fde0b0", "clean-up": "#cfe8cf"}
LOSS_STYLES = {  # (probe, metric): style
    ("loss", "train"): dict(color="tab:blue", lw=1.2, label="train loss"),
    ("loss", "eval"): dict(color="black", lw=1.4, label="test loss (held-out pairs)"),
    ("grokking", "restricted_loss"): dict(color="tab:green", lw=1.4, label="restricted loss (key frequencies only)"),
    ("grokking", "excluded_loss"): dict(color="tab:red", lw=1.4, label="excluded loss (train pairs, key frequencies removed)"),
}


@register_study("modular_addition")
def grokking_study(run: Run, out: Path) -> StudyReport:
    summary = summarize_grokking(run)
    metrics = run.metrics()
    figures = {
        "progress_measures": plot_progress_measures(metrics, summary, out / "progress_measures.png"),
        "fourier_norms": plot_fourier_norms(run, out / "fourier_norms.png"),
    }
    captions = {
        "progress_measures": "Every measure on one timeline, the phases shaded (grey: memorisation, orange: circuit "
                             "formation, green: clean-up). Grokking shows as train accuracy at 1.0 long before test accuracy "
                             "passes 0.95; in between, restricted loss falls and excluded loss rises, and clean-up shrinks "
                             "the weights. Steps in the Fourier measures are frequencies crossing the key-frequency line.",
        "fourier_norms": "The embedding's norm per frequency k (numbers as waves cos/sin(2πka/p)) at the last step with "
                         "an artifact; key frequencies (red) carry most of it.",
    }
    text = summary.text()
    return StudyReport(
        summary=[f"Run `{run.path}` ({run.status}): modular addition over p = {summary.p}, {summary.steps} steps.",
                 "## What happened\n\n" + "\n\n".join(text.splitlines())],
        figures=figures_section(figures, captions),
        extra=["## Phases\n\n" + phase_table(summary), "## Components\n\n" + component_table(run, summary)],
    )


def component_table(run: Run, summary: GrokkingSummary) -> str:
    """Every head and MLP ranked by the held-out answer loss with it mean-ablated (`analysis.components`), at the final
    checkpoint and at the first one after clean-up; only once test accuracy has passed its bar (a solution to take apart)."""
    if summary.test_solved is None:
        return f"Not measured: test accuracy never passed {TEST_SOLVED}, so there is no generalising solution to take apart."
    steps = ablation_steps(run.checkpoint_steps(), summary.cleanup[1] if summary.cleanup is not None else None)
    found, reason = ablations_at(run, steps, None, "answer", leave_out="train_pairs")
    if reason is not None:
        return f"Not measured: {reason}."
    final = found[0]
    ranked = sorted(final.ablated, key=lambda node: -final.ablated[node])
    head = "| component | " + " | ".join(f"held-out answer loss, ablated at step {a.step}" for a in found) + " |"
    rows = [head, "|---|" + "---|" * len(found),
            "| none (clean) | " + " | ".join(f"{a.clean:.3f}" for a in found) + " |"]
    rows += [f"| {node_label(node)} | " + " | ".join(f"{a.ablated[node]:.3f}" for a in found) + " |" for node in ranked]
    return ("Each head (its mixed values) and each MLP (its output) is replaced by its mean over the probe batch, one "
            "at a time, and the answer loss is read on the held-out pairs (not the training pairs), at the final checkpoint"
            + (" and the first one after clean-up" if len(found) > 1 else "") + "; ranked by the first column, the "
            "component the generalising solution needs most first (see docs/concepts/claims.md).\n\n" + "\n".join(rows))


def phase_table(summary: GrokkingSummary) -> str:
    if not summary.phases:
        return ("No phases: they need train accuracy at 1.0 before a clear rise of the test accuracy "
                "(memorisation, then circuit formation, then clean-up).")
    rows = ["| phase | steps | what the measures do |", "|---|---|---|"]
    said = {
        "memorisation": "train accuracy rises to 1.0" + (
            f"; test loss {summary.memorised_test_loss.before:.2f} → {summary.memorised_test_loss.after:.2f}"
            if summary.memorised_test_loss is not None else ""),
        "circuit formation": _formation_text(summary),
        "clean-up": "; ".join(["test accuracy rises (10% to 90% of its rise)"] + [
            f"{name} {c.before:.{digits}f} → {c.after:.{digits}f}"
            for name, c, digits in (("test loss", summary.test_loss, 2), ("weight norm", summary.weight_norm, 1))
            if c is not None and c.fell]),
    }
    for phase in summary.phases:
        rows.append(f"| {phase.name} | {phase.start}–{phase.end} | {said[phase.name]} |")
    return "\n".join(rows)


def _formation_text(summary: GrokkingSummary) -> str:
    parts = []
    for name, c in (("restricted loss", summary.restricted), ("excluded loss", summary.excluded)):
        if c is not None:
            verb = "falls" if c.fell else "rises" if c.rose else "does not move clearly"
            parts.append(f"{name} {verb} ({c.before:.2f} → {c.after:.2f})")
    return "; ".join(parts) or "no progress measures recorded"


def _shade(ax, summary: GrokkingSummary) -> None:
    for phase in summary.phases:
        ax.axvspan(phase.start, phase.end, color=PHASE_COLORS[phase.name], alpha=0.6, lw=0)


def plot_progress_measures(metrics: pd.DataFrame, summary: GrokkingSummary, path: Path) -> Figure:
    """Losses (log scale), accuracies, and the Fourier measures with the weight norm, on one shared step axis."""
    missing = []
    losses = {key: series(metrics, *key) for key in LOSS_STYLES}
    acc = {name: series(metrics, "loss", name) for name in ("train_acc", "eval_acc")}
    fourier = {name: series(metrics, "grokking", name) for name in ("fourier_gini", "key_frequency_share", "weight_norm")}
    if all(frame.empty for frame in losses.values()):
        return Figure(None, ["losses"])
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax = axes[0]
    _shade(ax, summary)
    for key, style in LOSS_STYLES.items():
        if len(losses[key]):
            ax.plot(losses[key]["step"], losses[key]["value"].clip(lower=1e-8), **style)
        else:
            missing.append(f"{key[0]}/{key[1]}")
    ax.set_yscale("log")
    ax.set_ylabel("cross-entropy (nats, log scale)")
    ax.set_title("(a) losses")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    ax = axes[1]
    _shade(ax, summary)
    for name, style in (("train_acc", dict(color="tab:blue", label="train accuracy")),
                        ("eval_acc", dict(color="black", label="test accuracy"))):
        if len(acc[name]):
            ax.plot(acc[name]["step"], acc[name]["value"], lw=1.4, **style)
        else:
            missing.append(f"loss/{name}")
    for step, label in ((summary.train_solved, "train acc 1.0"), (summary.test_solved, "test acc ≥ 0.95")):
        if step is not None:
            ax.axvline(step, color="0.3", ls=":", lw=1)
            ax.annotate(f"{label}\n(step {step})", (step, 0.5), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("accuracy")
    ax.set_title("(b) accuracy")
    ax.legend(fontsize=8, loc="center right", framealpha=0.9)
    ax = axes[2]
    _shade(ax, summary)
    for name, color in (("fourier_gini", "tab:purple"), ("key_frequency_share", "tab:orange")):
        if len(fourier[name]):
            ax.plot(fourier[name]["step"], fourier[name]["value"], color=color, lw=1.4, label=name.replace("_", " "))
        else:
            missing.append(f"grokking/{name}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("share / Gini")
    ax.set_xlabel("step")
    ax.set_title("(c) Fourier sparsity of the embedding, and the weight norm")
    if len(fourier["weight_norm"]):
        twin = ax.twinx()
        twin.plot(fourier["weight_norm"]["step"], fourier["weight_norm"]["value"], color="0.4", ls="--", lw=1.2, label="weight norm")
        twin.set_ylabel("weight norm (L2)")
        twin.legend(fontsize=8, loc="lower right", framealpha=0.9)
    else:
        missing.append("grokking/weight_norm")
    ax.legend(fontsize=8, loc="center right", framealpha=0.9)
    fig.suptitle("Grokking: progress measures on one timeline", fontsize=12)
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path, missing)


def plot_fourier_norms(run: Run, path: Path) -> Figure:
    """Bars of the embedding's norm per frequency from the last `grokking` artifact, key frequencies in red."""
    found = key_frequency_artifact(run)
    if found is None:
        return Figure(None, ["grokking artifacts (per-frequency norms)"])
    step, artifact = found
    keys = set(artifact["key_frequencies"])
    freqs, norms = artifact["frequencies"], artifact["norms"]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(freqs, norms, color=["tab:red" if k in keys else "0.6" for k in freqs], width=0.8)
    ax.set_xlabel("frequency k")
    ax.set_ylabel("embedding norm")
    ax.set_title(f"Embedding in the Fourier basis at step {step}: key frequencies {', '.join(map(str, sorted(keys))) or 'none'}")
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path)
