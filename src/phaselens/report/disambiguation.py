"""The report part of the late-disambiguation study: the plateau near log K, τ, and the alignment of the diagnostics."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from phaselens.analysis.disambiguation import DIAGNOSTICS, Alignment, summarize_disambiguation
from phaselens.report import StudyReport, figures_section, register_study
from phaselens.report.plotting import (
    Figure,
    head_label,
    mark_transition,
    metric_rows,
    per_head_table,
    per_layer_table,
    save_figure,
    stream_label,
)
from phaselens.run import Run
from phaselens.signals.levels import final_level, initial_level
from phaselens.signals.sources import prefer_source
from phaselens.tasks.disambiguation_config import VARIANTS

LOSS_STYLES = {
    "train": dict(color="0.6", lw=0.6, alpha=0.6, label="train (batch, all targets)"),
    "first_target": dict(color="tab:blue", lw=1.4, label="first target token"),
    "z_shuffled": dict(color="tab:red", lw=1.2, label="first target, z shuffled"),
    "eval": dict(color="black", marker="o", ls="", ms=2.5, label="eval (all targets)"),
}
TAU_COLOR = "#2a7a2a"


@register_study(*VARIANTS)
def disambiguation_study(run: Run, out: Path) -> StudyReport:
    summary = summarize_disambiguation(run)
    metrics = run.metrics()
    k = summary.k
    transition = summary.alignment.reference
    figures = {
        "dashboard": plot_disamb_dashboard(metrics, k, summary.tau, transition, out / "dashboard.png"),
        "attention_to_z": plot_attention_to_z(metrics, transition, out / "attention_to_z.png"),
        "logit_lens": plot_first_target_lens(metrics, k, transition, out / "logit_lens.png"),
        "z_dependence": plot_z_dependence(metrics, transition, out / "z_dependence.png"),
    }
    log_k = math.log(k) if k > 0 else float("nan")
    captions = {
        "dashboard": f"Losses with the log K = {log_k:.2f} floor (dotted) on every loss panel; τ (green) is the first step "
                     "where the first-target loss is below 0.5·log K. The last panel puts every diagnostic on one "
                     "normalised timeline (0 = its first value, 1 = its last).",
        "attention_to_z": "Attention mass from the prediction of the first target token to the z tokens, per head.",
        "logit_lens": "Logit lens at the first target token: p(correct) when each residual stream is read through the "
                      f"final norm and unembedding; 1/K = {1 / max(k, 1):.2f} is what B alone allows.",
        "z_dependence": "Patching z of a pair partner (same B, other z) into each probe sequence: e_ℓ per residual "
                        "stream, z_dependence = mean of max_ℓ e_ℓ; and the random-z evaluation (probability drop and "
                        "argmax change when z is swapped). On the plateau the K candidates are nearly tied, so the "
                        "argmax flips with tiny changes: read the probability drop there.",
    }
    text = summary.text()
    if transition is not None:
        text += "\n" + drop_sentence(transition, log_k)
    return StudyReport(
        summary=[f"Run `{run.path}` ({run.status}): task `{summary.task}`, K = {k}, {summary.steps} steps.",
                 "## What happened\n\n" + "\n\n".join(text.splitlines())],
        figures=figures_section(figures, captions) + _post_hoc_hint(run, metrics),
        extra=["## Alignment of the diagnostics\n\n" + alignment_table(summary.alignment)],
    )


def drop_sentence(transition: dict, log_k: float) -> str:
    """The study's phenomenon in one sentence: the drop from the log K plateau, its window and effect size."""
    return (f"The drop from the log K = {log_k:.2f} plateau (the study's headline transition, not the strongest "
            f"first-target change): step {transition['step']}, 10–90% window {transition['start']}–{transition['end']}, "
            f"first-target loss {transition['before']:.2f} → {transition['after']:.2f} "
            f"(effect size {transition['effect']:.2f} of the loss's range).")


def alignment_table(found: Alignment) -> str:
    if not found.rows:
        return "No diagnostics recorded."
    lines = ["| diagnostic | probe / metric | series | step | window | effect | overlaps the loss window |",
             "|---|---|---|---|---|---|---|"]
    for row in found.rows:
        window = "–" if row["step"] is None else f"{row['start']}–{row['end']}"
        effect = "–" if row.get("effect") is None else f"{row['effect']:.2f}"
        overlaps = {None: "–", True: "yes", False: "no"}[row["overlaps"]]
        lines.append(f"| {row['diagnostic']} | `{row['probe']}` `{row['metric']}` | {row['series'] or '–'} | "
                     f"{'–' if row['step'] is None else row['step']} | {window} | {effect} | {overlaps} |")
    verdict = found.coincide()
    note = {None: "Not enough transitions to compare (run `phaselens probe RUN` for the post-hoc diagnostics).",
            True: "All diagnostics change within the first-target loss window: one mechanism, seen from several sides.",
            False: "Some diagnostics change outside the first-target loss window (see `no` above)."}[verdict]
    return "\n".join(lines) + "\n\n" + note


def _post_hoc_hint(run: Run, metrics: pd.DataFrame) -> str:
    if (metrics["probe"].isin(["attention_to", "patching", "logit_lens"])).any():
        return ""
    return f"\n\nNo post-hoc probe results yet: run `phaselens probe {run.path}` for attention to z, logit lens and z_dependence."


def _log_k_line(ax, k: int) -> None:
    if k <= 1:
        return
    log_k = math.log(k)
    ax.axhline(log_k, color="0.3", ls=":", lw=1.2)
    ax.annotate(f"log K = {log_k:.2f}", (0.99, log_k), xycoords=("axes fraction", "data"), xytext=(0, 3),
                textcoords="offset points", ha="right", va="bottom", fontsize=8, color="0.3")


def _mark(ax, tau: int | None, transition: dict | None) -> None:
    mark_transition(ax, transition)
    if tau is not None:
        ax.axvline(tau, color=TAU_COLOR, lw=1.2)


def _live_or_checkpoint(frame: pd.DataFrame) -> pd.DataFrame:
    return prefer_source(frame, "live")


def _loss_frames(metrics: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {name: _live_or_checkpoint(metric_rows(metrics, "loss", name)) for name in LOSS_STYLES}


def _normalised(series: pd.Series) -> pd.Series:
    """0 at the series' initial level, 1 at its final level (each end a median of 5% of the points)."""
    lo, hi = initial_level(series), final_level(series)
    return (series - lo) / (hi - lo) if abs(hi - lo) > 1e-12 else series * 0


def _series_key(layer, head) -> str:
    return "model" if pd.isna(layer) else f"L{int(layer)}" + ("" if pd.isna(head) else f"H{int(head)}")


def timeline(metrics: pd.DataFrame) -> dict[str, pd.Series]:
    """Every diagnostic as one series by step (per-layer/head metrics: the series that changes most)."""
    out = {}
    for label, probe, metric in DIAGNOSTICS:
        frame = _live_or_checkpoint(metric_rows(metrics, probe, metric))
        if frame.empty:
            continue
        frame = frame.assign(key=[_series_key(layer, head) for layer, head in zip(frame["layer"], frame["head"])])
        table = frame.pivot_table(index="step", columns="key", values="value").sort_index()
        change = (table.apply(final_level) - table.apply(initial_level)).abs().dropna()
        if len(change):
            out[label] = table[change.idxmax()].dropna()
    return out


def plot_disamb_dashboard(metrics: pd.DataFrame, k: int, tau: int | None, transition: dict | None, path: Path) -> Figure:
    """Losses (with log K), attention to z, logit lens, z_dependence, and one normalised timeline."""
    losses = _loss_frames(metrics)
    gap = _live_or_checkpoint(metric_rows(metrics, "loss", "z_shuffle_gap"))
    attention = per_head_table(metric_rows(metrics, "attention_to", "mass"))
    attention = attention.T.groupby(level=0).mean().T if not attention.empty else attention  # mean over heads per layer
    lens = per_layer_table(metric_rows(metrics, "logit_lens", "p_correct"))
    z_dep = metric_rows(metrics, "patching", "z_dependence")
    lines = timeline(metrics)

    def draw_losses(ax):
        for name, style in LOSS_STYLES.items():
            if len(losses[name]):
                ax.plot(losses[name]["step"], losses[name]["value"], **style)
        _log_k_line(ax, k)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title("(a) losses")
        ax.legend(fontsize=7, loc="lower left")

    def draw_gap(ax):
        ax.plot(gap["step"], gap["value"], color="tab:purple", lw=1.2)
        _log_k_line(ax, k)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylabel("z_shuffled − first_target (nats)")
        ax.set_title("(b) z-shuffle gap")

    def draw_per_layer(table, title, ylabel, floor=None):
        def draw(ax):
            colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(2, table.shape[1])))
            for color, layer in zip(colors, table.columns):
                ax.plot(table.index, table[layer], color=color, lw=1.2, marker="o", ms=2, label=f"layer {int(layer)}")
            if floor is not None:
                ax.axhline(floor, color="0.3", ls=":", lw=1.2)
            ax.set_ylim(0, 1.05)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7, loc="upper left")
        return draw

    def draw_z(ax):
        ax.plot(z_dep["step"], z_dep["value"], color="tab:red", lw=1.4, marker="o", ms=2)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_title("(e) z_dependence (patching)")
        ax.set_ylabel("mean max_ℓ e_ℓ (Δ p)")

    def draw_timeline(ax):
        for label, series in lines.items():
            ax.plot(series.index, _normalised(series), lw=1.2, label=label)
        ax.set_title("(f) all diagnostics, normalised (0 = start level, 1 = end level)")
        ax.set_ylabel("normalised change")
        ax.legend(fontsize=7, loc="center right")

    panels = [
        ("(a) losses", "probe `loss`", any(len(f) for f in losses.values()), draw_losses),
        ("(b) z-shuffle gap", "probe `loss`, metric `z_shuffle_gap`", len(gap) > 0, draw_gap),
        ("(c) attention to z", "post-hoc probe `attention_to`", not attention.empty,
         draw_per_layer(attention, "(c) attention to z per layer (mean over heads)", "attention mass")),
        ("(d) logit lens", "post-hoc probe `logit_lens`", not lens.empty,
         draw_per_layer(lens, "(d) logit lens p(first target) per stream", "p(correct)", 1 / max(k, 1))),
        ("(e) z_dependence", "post-hoc probe `patching`", len(z_dep) > 0, draw_z),
        ("(f) timeline", "any diagnostic", bool(lines), draw_timeline),
    ]
    missing = [f"{name} — {what}" for name, what, recorded, _ in panels if not recorded]
    drawn = [draw for _, _, recorded, draw in panels if recorded]
    if not drawn:
        return Figure(None, missing)
    cols = 2 if len(drawn) > 1 else 1
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows + 0.5), sharex=True, squeeze=False)
    axes = axes.ravel()
    for ax, draw in zip(axes, drawn):
        _mark(ax, tau, transition)
        draw(ax)
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
    for ax in axes[len(drawn):]:
        ax.remove()
    title = "Late disambiguation" + (f": τ = {tau}" if tau is not None else "")
    fig.suptitle(title + ("  (green: τ; dashed/shaded: first-target loss transition)" if transition or tau else ""), fontsize=12)
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path, missing)


def plot_attention_to_z(metrics: pd.DataFrame, transition: dict | None, path: Path) -> Figure:
    table = per_head_table(metric_rows(metrics, "attention_to", "mass"))
    if table.empty:
        return Figure(None, ["attention to z — post-hoc probe `attention_to`, metric `mass`"])
    layers = sorted({int(layer) for layer, _ in table.columns})
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        mark_transition(ax, transition)
        for col in [c for c in table.columns if int(c[0]) == layer]:
            ax.plot(table.index, table[col], lw=1.2, marker="o", ms=2, label=head_label(*col))
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("checkpoint step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("attention mass on z")
    fig.suptitle("Attention from the first-target prediction to z (post-hoc, probe batch)")
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path)


def plot_first_target_lens(metrics: pd.DataFrame, k: int, transition: dict | None, path: Path) -> Figure:
    table = per_layer_table(metric_rows(metrics, "logit_lens", "p_correct"))
    if table.empty:
        return Figure(None, ["logit lens — post-hoc probe `logit_lens`, metric `p_correct`"])
    n_layers = int(max(table.columns))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    mark_transition(ax, transition)
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(2, table.shape[1])))
    for color, layer in zip(colors, table.columns):
        ax.plot(table.index, table[layer], color=color, lw=1.4, marker="o", ms=3, label=stream_label(int(layer), n_layers))
    if k > 1:
        ax.axhline(1 / k, color="0.3", ls=":", lw=1.2)
        ax.annotate(f"1/K = {1 / k:.2f}", (0.99, 1 / k), xycoords=("axes fraction", "data"), xytext=(0, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=8, color="0.3")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("p(correct first target token)")
    ax.legend(fontsize=8, title="residual stream", title_fontsize=8, loc="upper left")
    ax.set_title("Logit lens at the first target token (post-hoc, probe batch)")
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path)


def plot_z_dependence(metrics: pd.DataFrame, transition: dict | None, path: Path) -> Figure:
    effect = per_layer_table(metric_rows(metrics, "patching", "effect"))
    z_dep = metric_rows(metrics, "patching", "z_dependence")
    drop = metric_rows(metrics, "random_z", "p_drop")
    change = metric_rows(metrics, "random_z", "argmax_change")
    if effect.empty and z_dep.empty and drop.empty:
        return Figure(None, ["z_dependence — post-hoc probes `patching` and `random_z`"])
    missing = [] if len(drop) else ["random-z evaluation — post-hoc probe `random_z`"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
    ax = axes[0][0]
    mark_transition(ax, transition)
    if not effect.empty:
        n_layers = int(max(effect.columns))
        colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(2, effect.shape[1])))
        for color, layer in zip(colors, effect.columns):
            ax.plot(effect.index, effect[layer], color=color, lw=1.0, label=f"e_ℓ, {stream_label(int(layer), n_layers)}")
    ax.plot(z_dep["step"], z_dep["value"], color="tab:red", lw=2, marker="o", ms=3, label="z_dependence")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_title("(a) patching z from the pair partner")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("Δ p(first target₂)")
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[0][1]
    mark_transition(ax, transition)
    if len(drop):
        ax.plot(drop["step"], drop["value"], color="tab:orange", lw=1.4, marker="o", ms=3, label="p drop")
        ax.plot(change["step"], change["value"], color="tab:green", lw=1.4, marker="o", ms=3, label="argmax change rate")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("(b) random-z evaluation")
    ax.set_xlabel("checkpoint step")
    fig.suptitle("How much the first target depends on z (post-hoc, probe batch)")
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path, missing)
