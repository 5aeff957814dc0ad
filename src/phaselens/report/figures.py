"""The report's figures, drawn from a run's metrics frame (no torch, no model).

Each `plot_*` function takes the metrics rows it needs and writes one PNG. Panels whose
metrics a run did not record are left out, and their names come back in `Figure.missing`,
so the report can say what is absent instead of crashing on a run with only some probes.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.lines import Line2D
from matplotlib.patches import Patch
import numpy as np
import pandas as pd

from phaselens.report.plotting import (
    TRANSITION_COLOR,
    Figure,
    head_label,
    mark_transition,
    metric_rows,
    per_head_table,
    per_layer_table,
    plt,
    save_figure,
    stream_label,
)
from phaselens.signals.levels import final_level

SCORES = ("induction", "prev_token", "duplicate")
SCORE_TITLES = {"induction": "induction score", "prev_token": "previous-token score", "duplicate": "duplicate-token score"}


def _finish_tight(fig, transition: dict | None, title: str, path: Path, fontsize: int = 12) -> None:
    """Centred title, the shared transition legend, tight layout, saved and closed."""
    fig.suptitle(title, fontsize=fontsize)
    _transition_legend(fig, transition)
    fig.tight_layout()
    save_figure(fig, path)


def _transition_legend(fig, transition: dict | None) -> None:
    """One legend for the markers every panel shares, top right beside the title."""
    if transition is None:
        return
    handles = [
        Line2D([], [], color=TRANSITION_COLOR, ls="--", lw=1, label=f"copy-loss transition (step {transition['step']})"),
        Patch(color=TRANSITION_COLOR, alpha=0.1, lw=0, label=f"10–90% window ({transition['start']}–{transition['end']})"),
    ]
    fig.legend(handles=handles, loc="upper right", ncol=2, fontsize=8, frameon=False)


LOSS_STYLES = {  # drawn in this order: the faint batch loss underneath, eval on top
    "train": dict(color="0.55", lw=0.5, alpha=0.5, label="train (batch)"),
    "non_copy": dict(color="tab:orange", lw=1.2, label="non-copy positions"),
    "copy": dict(color="tab:blue", lw=1.4, label="copy positions"),
    "eval": dict(color="black", marker="o", ls="", ms=3.5, label="eval"),
}


def _draw_loss(ax, losses: dict[str, pd.DataFrame], vocab: int) -> None:
    for name, style in LOSS_STYLES.items():
        if len(losses[name]):
            ax.plot(losses[name]["step"], losses[name]["value"], **style)
    chance = math.log(vocab)
    ax.axhline(chance, color="0.3", ls=":", lw=1.2)
    # below the line at the right: after training the curves there sit above (non-copy) or far below it
    ax.annotate(f"chance: ln {vocab} = {chance:.2f}", (0.99, chance), xycoords=("axes fraction", "data"),
                xytext=(0, -4), textcoords="offset points", ha="right", va="top", fontsize=8, color="0.3")
    top = max([chance] + [float(frame["value"].max()) for frame in losses.values() if len(frame)])
    ax.set_ylim(0, 1.12 * top)  # headroom, so a run that never leaves chance keeps its curves off the frame
    ax.set_title("(a) loss (live, training batch)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)


def top_heads(metrics: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The head with the highest final induction score and the one with the highest previous-token score
    (label, scores by step; each series is named by its (layer, head))."""
    out = []
    for score in ("induction", "prev_token"):
        table = per_head_table(metric_rows(metrics, "heads", score))
        if not table.empty:
            layer, head = max(table.columns, key=lambda col: final_level(table[col]))  # a pivot column has a value
            out.append((f"{head_label(layer, head)} {score}", table[(layer, head)]))
    return out


def _draw_top_heads(ax, top: list[tuple[str, pd.Series]]) -> None:
    for (label, series), color in zip(top, ("tab:green", "tab:purple")):
        ax.plot(series.index, series, color=color, lw=1.2, label=label)
    ax.set_title("(b) top induction and previous-token heads")
    ax.set_ylabel("score (attention on the pattern)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")


def _drawper_layer_table(ax, table: pd.DataFrame, title: str, ylabel: str) -> None:
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.8, max(2, table.shape[1])))
    for color, layer in zip(colors, table.columns):
        ax.plot(table.index, table[layer], color=color, lw=1.2, label=f"layer {int(layer)}")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left")


def plot_dashboard(metrics: pd.DataFrame, transition: dict | None, vocab: int, path: Path) -> Figure:
    """Loss, top heads, coherence and specialization over steps, with the transition marked on each."""
    losses = {name: metric_rows(metrics, "loss", name) for name in LOSS_STYLES}
    top = top_heads(metrics)
    coherence = metric_rows(metrics, "attention", "coherence")
    coherence = coherence[coherence["head"].notna()].pivot_table(index="step", columns="layer", values="value")
    specialization = metric_rows(metrics, "attention", "specialization")
    specialization = specialization[specialization["head"].isna() & specialization["layer"].notna()]
    specialization = specialization.pivot_table(index="step", columns="layer", values="value")
    panels = [  # (name, what it needs, recorded, draw)
        ("(a) loss", "probe `loss`", any(len(frame) for frame in losses.values()),
         lambda ax: _draw_loss(ax, losses, vocab)),
        ("(b) top heads", "probe `heads`, metrics `induction`, `prev_token`", bool(top),
         lambda ax: _draw_top_heads(ax, top)),
        ("(c) coherence per layer", "probe `attention`, metric `coherence`", not coherence.empty,
         lambda ax: _drawper_layer_table(ax, coherence, "(c) coherence σ_p per layer (mean over heads)", "σ_p = 1 − H / ln(keys)")),
        ("(d) specialization per layer", "probe `attention`, metric `specialization`", not specialization.empty,
         lambda ax: _drawper_layer_table(ax, specialization, "(d) specialization σ_a per layer", "σ_a (total variation, 0–1)")),
    ]
    missing = [f"{name} — {what}" for name, what, recorded, _ in panels if not recorded]
    drawn = [draw for _, _, recorded, draw in panels if recorded]
    if not drawn:
        return Figure(None, missing)

    rows, cols = (1, len(drawn)) if len(drawn) <= 2 else (2, 2)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols + (1 if cols == 1 else 0), 4 * rows + 0.4), sharex=True, squeeze=False)
    axes = axes.ravel()
    for ax, draw in zip(axes, drawn):
        mark_transition(ax, transition)
        draw(ax)
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
    for ax in axes[len(drawn):]:
        ax.remove()
    _finish_tight(fig, transition, "Training dashboard", path, fontsize=13)
    return Figure(path, missing)

def plot_entropy_heatmap(metrics: pd.DataFrame, transition: dict | None, path: Path) -> Figure:
    """Attention entropy of every head (rows) at every step (columns)."""
    table = per_head_table(metric_rows(metrics, "attention", "entropy"))
    if table.empty:
        return Figure(None, ["attention entropy — probe `attention`, metric `entropy`"])
    labels = [head_label(layer, head) for layer, head in table.columns]
    values = table.to_numpy().T  # (layer·head, step)
    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.45 * len(labels)), layout="constrained")
    # "nearest" shading centres each cell on its step, so uneven telemetry intervals stay honest
    mesh = ax.pcolormesh(table.index.to_numpy(), np.arange(len(labels)), values, shading="nearest", cmap="magma", rasterized=True)
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.invert_yaxis()  # L0H0 on top, as heads are read
    layers = [layer for layer, _ in table.columns]
    for row in range(1, len(layers)):
        if layers[row] != layers[row - 1]:
            ax.axhline(row - 0.5, color="white", lw=1.5)
    if transition is not None:
        ax.axvline(transition["step"], color="white", ls="--", lw=1.2)
        ax.annotate(f"transition (step {transition['step']})", (transition["step"], 0), xytext=(4, 0),
                    textcoords="offset points", color="white", fontsize=8, va="center")
    fig.colorbar(mesh, ax=ax, label="entropy (nats)", pad=0.01)
    ax.set_xlabel("step")
    ax.set_ylabel("head")
    ax.set_title("Attention entropy per head over training (low = focused, high = spread out)")
    save_figure(fig, path)
    return Figure(path)


def plot_head_scores(metrics: pd.DataFrame, transition: dict | None, path: Path) -> Figure:
    """One panel per head score, one line per head."""
    tables = {score: per_head_table(metric_rows(metrics, "heads", score)) for score in SCORES}
    present = [score for score in SCORES if not tables[score].empty]
    missing = [f"{SCORE_TITLES[score]} — probe `heads`, metric `{score}`" for score in SCORES if score not in present]
    if not present:
        return Figure(None, missing)
    heads = sorted({col for score in present for col in tables[score].columns})
    colors = dict(zip(heads, plt.get_cmap("tab10" if len(heads) <= 10 else "tab20").colors))
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 4.2), sharey=True, squeeze=False)
    for ax, score in zip(axes[0], present):
        table = tables[score]
        for col in table.columns:
            ax.plot(table.index, table[col], color=colors[col], lw=1.1, label=head_label(*col))
        mark_transition(ax, transition)
        ax.set_title(SCORE_TITLES[score])
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("score (attention on the pattern)")
    axes[0][-1].legend(fontsize=8, title="head", loc="upper left", bbox_to_anchor=(1.01, 1))
    _finish_tight(fig, transition, "Head scores (live, training batch)", path)
    return Figure(path, missing)


SERIES_LOSSES = {"all": dict(color="black", lw=1.4, marker="o", ms=3, label="probe text"),
                 "eval": dict(color="tab:blue", lw=1.2, marker="o", ms=3, label="eval")}


def _mark_series(ax, transitions: pd.DataFrame, probe: str, metric: str, layer=None, head=None) -> int:
    """Every transition of one series on an axis (line at its step over its 10–90% window); how many were drawn."""
    rows = transitions[(transitions["probe"] == probe) & (transitions["metric"] == metric)]
    rows = rows[rows["layer"].isna()] if layer is None else rows[(rows["layer"] == layer) & (rows["head"] == head)]
    for row in rows.to_dict("records"):
        mark_transition(ax, row)
    return len(rows)


def plot_series_headlines(metrics: pd.DataFrame, transitions: pd.DataFrame, vocab: int, path: Path,
                          log_steps: bool = False) -> Figure:
    """A checkpoint series' headline curves over its revisions' steps, each with its own transitions marked:
    the loss on the probe text, the top induction and previous-token heads, and the in-context score."""
    losses = {name: metric_rows(metrics, "loss", name) for name in SERIES_LOSSES}
    top = top_heads(metrics)
    icl = metric_rows(metrics, "loss", "icl_score")

    def draw_loss(ax) -> int:
        for name, style in SERIES_LOSSES.items():
            if len(losses[name]):
                ax.plot(losses[name]["step"], losses[name]["value"], **style)
        ax.axhline(math.log(vocab), color="0.3", ls=":", lw=1.2, label=f"uniform: ln {vocab} = {math.log(vocab):.2f}")
        ax.set_title("(a) loss at each revision")
        ax.set_ylabel("cross-entropy (nats)")
        ax.legend(fontsize=8, loc="best")
        return sum(_mark_series(ax, transitions, "loss", name) for name in SERIES_LOSSES)

    def draw_heads(ax) -> int:
        _draw_top_heads(ax, top)
        return sum(_mark_series(ax, transitions, "heads", label.split()[-1], *series.name) for label, series in top)

    def draw_icl(ax) -> int:
        ax.plot(icl["step"], icl["value"], color="tab:red", lw=1.2, marker="o", ms=3)
        ax.axhline(0, color="0.3", ls=":", lw=1)
        ax.set_title("(c) in-context score (late − early loss)")
        ax.set_ylabel("nats (below 0: the context helps)")
        return _mark_series(ax, transitions, "loss", "icl_score")

    panels = [  # (name, what it needs, recorded, draw)
        ("(a) loss", "probe `loss`", any(len(frame) for frame in losses.values()), draw_loss),
        ("(b) top heads", "probe `heads`, metrics `induction`, `prev_token`", bool(top), draw_heads),
    ]
    missing = [f"{name} — {what}" for name, what, recorded, _ in panels if not recorded]
    if len(icl):  # only where the contexts reach token 500: never missing from a series with shorter ones
        panels.append(("(c) in-context score", "", True, draw_icl))
    drawn = [draw for _, _, recorded, draw in panels if recorded]
    if not drawn:
        return Figure(None, missing)
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.2 * len(drawn), 4.2), squeeze=False)
    marked = 0
    for ax, draw in zip(axes[0], drawn):
        marked += draw(ax)
        ax.set_xlabel("step (log scale)" if log_steps else "step")
        if log_steps:
            ax.set_xscale("symlog", linthresh=1)  # step 0 stays on the axis
        ax.grid(alpha=0.25)
    title = "Checkpoint series: headline curves"
    fig.suptitle(title + (" (dashed: a transition of the curve; shaded: its 10–90% window)" if marked else ""), fontsize=12)
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path, missing)


# ---------------------------------------------------------------------------- post-hoc probes (checkpoints)


MIN_EFFECT_SCALE = 0.05  # patching effects (Δ p) smaller than this are drawn as nothing, not stretched to fill the axes
MAX_ANNOTATED_CHECKPOINTS = 24  # beyond this the numbers in the cells no longer fit


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Cell boundaries centred on each checkpoint (uneven intervals stay honest); a lone checkpoint gets a cell too."""
    steps = steps.astype(float)
    if len(steps) == 1:
        half = max(1.0, 0.05 * abs(steps[0]))
        return np.array([steps[0] - half, steps[0] + half])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def _layer_heatmap(ax, table: pd.DataFrame, transition: dict | None, marker: str, fmt: str, **style):
    """Layers (rows, embeddings on top) × checkpoint steps (columns), with the transition as a vertical line."""
    n_layers = int(max(table.columns))
    values = table.to_numpy().T  # (layer, step)
    mesh = ax.pcolormesh(_cell_edges(table.index.to_numpy()), np.arange(len(table.columns) + 1) - 0.5, values, **style)
    ax.set_yticks(np.arange(len(table.columns)), [stream_label(int(layer), n_layers) for layer in table.columns])
    ax.invert_yaxis()  # the embeddings on top, the output at the bottom: the order the stream flows
    if values.shape[1] <= MAX_ANNOTATED_CHECKPOINTS:  # few checkpoints: print the numbers, colour alone hides small ones
        for (row, col), value in np.ndenumerate(values):
            if np.isfinite(value):
                r, g, b, _ = mesh.cmap(mesh.norm(value))
                text = format(value, fmt)
                text = text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"
                ax.text(table.index[col], row, text, ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    ax.set_xlabel("checkpoint step")
    if transition is not None:  # said in the axis label: text inside the cells would cover their numbers
        ax.axvline(transition["step"], color=marker, ls="--", lw=1.2)
        ax.set_xlabel(f"checkpoint step (dashed: copy-loss transition, step {transition['step']})")
    ax.set_ylabel("residual stream")
    return mesh


def _layer_lines(ax, table: pd.DataFrame) -> None:
    n_layers = int(max(table.columns))
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(2, table.shape[1])))
    for color, layer in zip(colors, table.columns):
        ax.plot(table.index, table[layer], color=color, lw=1.4, marker="o", ms=3, label=stream_label(int(layer), n_layers))


def _finish(fig, transition: dict | None, title: str, path: Path) -> None:
    # left-aligned: constrained layout keeps no room for the transition legend at the top right beside a centred title
    fig.suptitle(title, fontsize=12, x=0.01, ha="left")
    _transition_legend(fig, transition)
    save_figure(fig, path)


def plot_logit_lens(metrics: pd.DataFrame, transition: dict | None, vocab: int, path: Path) -> Figure:
    """Logit-lens p(correct next token) per residual stream × checkpoint, as a heatmap and as lines."""
    table = per_layer_table(metric_rows(metrics, "logit_lens", "p_correct"))
    if table.empty:
        return Figure(None, ["logit lens — post-hoc probe `logit_lens`, metric `p_correct`"])
    fig = plt.figure(figsize=(12, 2.4 + 0.45 * table.shape[1] + 3.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2 + 0.45 * table.shape[1], 3.2])
    ax = top.subplots()
    # an absolute scale from 0: a stream that never predicts stays dark instead of being stretched over noise
    top_value = max(float(np.nanmax(table.to_numpy())), 2 / vocab)
    mesh = _layer_heatmap(ax, table, transition, "white", ".3f", cmap="viridis", vmin=0, vmax=top_value, rasterized=True)
    top.colorbar(mesh, ax=ax, label="p(correct next token)", pad=0.01)
    ax.set_title("(a) logit lens: each residual stream read through the final norm and unembedding")
    ax_line = bottom.subplots()
    mark_transition(ax_line, transition)
    _layer_lines(ax_line, table)
    ax_line.axhline(1 / vocab, color="0.3", ls=":", lw=1.2)
    ax_line.annotate(f"chance: 1/{vocab}", (0.99, 1 / vocab), xycoords=("axes fraction", "data"), xytext=(0, 3),
                     textcoords="offset points", ha="right", va="bottom", fontsize=8, color="0.3")
    ax_line.set_xlim(ax.get_xlim())
    # headroom above chance, so a run that never leaves it keeps its lines (and the chance label) off the frame
    ax_line.set_ylim(0, 1.15 * top_value)
    ax_line.set_title("(b) p(correct next token) per residual stream")
    ax_line.set_xlabel("checkpoint step")
    ax_line.set_ylabel("mean p(correct)")
    ax_line.legend(fontsize=8, loc="upper left", title="residual stream", title_fontsize=8)
    _finish(fig, transition, "Logit lens over checkpoints (post-hoc, probe batch)", path)
    return Figure(path)


def plot_patching(metrics: pd.DataFrame, transition: dict | None, path: Path) -> Figure:
    """Patching effect per residual stream × checkpoint, z_dependence, and (if measured) attention to the source."""
    effect = per_layer_table(metric_rows(metrics, "patching", "effect"))
    if effect.empty:
        return Figure(None, ["activation patching — post-hoc probe `patching`, metric `effect`"])
    z = metric_rows(metrics, "patching", "z_dependence")
    z = z[z["layer"].isna()]
    mass = per_head_table(metric_rows(metrics, "attention_to", "mass"))
    missing = [] if len(mass) else ["(c) attention to the source — post-hoc probe `attention_to`, metric `mass`"]
    fig = plt.figure(figsize=(12, 2.4 + 0.45 * effect.shape[1] + 3.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2 + 0.45 * effect.shape[1], 3.4])
    ax = top.subplots()
    # diverging around 0: white = patching changes nothing, red = restoring the stream restores the copy
    limit = max(float(np.nanmax(np.abs(effect.to_numpy()))), MIN_EFFECT_SCALE)
    mesh = _layer_heatmap(ax, effect, transition, "black", ".2f", cmap="RdBu_r", vmin=-limit, vmax=limit, rasterized=True)
    top.colorbar(mesh, ax=ax, label="effect e_ℓ (Δ p)", pad=0.01)
    ax.set_title("(a) effect of restoring the clean residual stream at the source segment")
    axes = bottom.subplots(1, 2 if len(mass) else 1, squeeze=False)[0]
    ax_z = axes[0]
    mark_transition(ax_z, transition)
    ax_z.plot(z["step"], z["value"], color="tab:red", lw=1.4, marker="o", ms=3)
    ax_z.axhline(0, color="0.3", lw=0.8)
    ax_z.set_xlim(ax.get_xlim())
    # the same floor as the heatmap: effects of 1e-4 must look like the nothing they are
    ax_z.set_ylim(min(0.0, 1.1 * float(z["value"].min())) if len(z) else 0.0,
                  max(MIN_EFFECT_SCALE, 1.1 * float(z["value"].max())) if len(z) else MIN_EFFECT_SCALE)
    ax_z.set_title("(b) z_dependence (mean over sequences of max_ℓ e_ℓ)")
    ax_z.set_xlabel("checkpoint step")
    ax_z.set_ylabel("Δ p(correct copy)")
    if len(mass):
        ax_mass = axes[1]
        mark_transition(ax_mass, transition)
        palette = plt.get_cmap("tab10" if mass.shape[1] <= 10 else "tab20").colors
        for i, col in enumerate(mass.columns):
            ax_mass.plot(mass.index, mass[col], color=palette[i % len(palette)], lw=1.2, marker="o", ms=3, label=head_label(*col))
        ax_mass.set_xlim(ax.get_xlim())
        ax_mass.set_ylim(0, 1)
        ax_mass.set_title("(c) attention from copy positions to the source")
        ax_mass.set_xlabel("checkpoint step")
        ax_mass.set_ylabel("attention mass")
        ax_mass.legend(fontsize=8, title="head", title_fontsize=8, loc="upper left", ncol=2)
    _finish(fig, transition, "Activation patching over checkpoints (post-hoc, probe batch)", path)
    return Figure(path, missing)
