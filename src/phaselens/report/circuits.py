"""The report's circuits section (any run the `circuits` probe measured with `phaselens probe`): the circuit at a few
key steps as a graph, an edge × step heatmap of the strongest edges, the circuit's stability over training (Jaccard
with the previous and the final checkpoint, with bootstrap intervals) beside the study's headline transitions, one
sentence per edge birth that stands out of its noise, and how EAP / EAP-IG rank edges against exact patching.
Everything is read from the probe's artifacts through `phaselens.analysis.circuits`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from phaselens.analysis.circuits import (BIRTH_SE, CONFIDENCE, PROBE, Birth, circuit_artifacts, circuit_stability,
                                         edge_births, edge_scores, membership, method_agreement)
from phaselens.report import figures_section, register_section
from phaselens.report.plotting import TRANSITION_COLOR, Figure, mark_transition, plt, save_figure, save_tight
from phaselens.run import Run
from phaselens.signals.transitions import MIN_EFFECT
from phaselens.store.circuit_artifact import EDGE_METRIC, CircuitArtifact, graph_columns

KEY_STEPS = 4  # circuits drawn: before, inside and after the first headline transition, and the final one
TOP_EDGES = 16  # rows of the edge × step heatmap
DRAWN_EDGES = 60  # edges drawn per graph: the circuit's, then the strongest others
POSITIVE, NEGATIVE = "#2060c0", "#c03020"  # patching the edge raises / lowers the metric (as the dashboard draws)
INPUT_OFFSET = {"q": 0.2, "k": 0.0, "v": -0.2}  # where an edge enters a head: its q, k or v input
COLUMN_GAP, ROW_GAP, NODE_WIDTH, NODE_HEIGHT = 2.0, 1.2, 0.9, 0.62  # the graph's layout, in data units
METHOD_NAMES = {"exact": "exact", "eap": "EAP", "eap_ig": "EAP-IG"}


def key_steps(steps: list[int], windows: pd.DataFrame) -> list[int]:
    """Up to `KEY_STEPS` measured steps to draw: the last before the first headline transition's window, the one nearest
    its steepest step, the first after its window, and the final step; spread over training where no transition is."""
    if not steps:
        return []
    if len(windows):
        first = windows.sort_values("step").iloc[0]
        before = [s for s in steps if s < first["start"]]
        after = [s for s in steps if s > first["end"]]
        inside = min(steps, key=lambda s: abs(s - first["step"]))
        picked = ([before[-1]] if before else []) + [inside] + ([after[0]] if after else []) + [steps[-1]]
    else:
        picked = [steps[round(i * (len(steps) - 1) / (KEY_STEPS - 1))] for i in range(KEY_STEPS)]
    return sorted(set(picked))


def draw_circuit(ax, artifact: CircuitArtifact) -> None:
    """One checkpoint's graph: nodes in layer columns, edges of width ∝ |score| (the circuit's method), the circuit
    solid and every other edge faint."""
    names = ["embed", "logits"] + [n for e in artifact.edges for n in (e.upstream, e.downstream)]
    places = graph_columns(list(dict.fromkeys(names)))
    rows = max(r for _, r in places.values()) + 1
    middle = -(rows - 1) * ROW_GAP / 2
    xy = {n: (c * COLUMN_GAP, middle if n in ("embed", "logits") or n.endswith("M") else -r * ROW_GAP)
          for n, (c, r) in places.items()}
    scores = np.array([e.scores.get(artifact.circuit_method, np.nan) for e in artifact.edges], dtype=float)
    strongest = np.nanmax(np.abs(scores)) if np.isfinite(scores).any() else 0.0
    order = sorted(range(len(artifact.edges)), key=lambda i: (not artifact.edges[i].in_circuit, -abs(np.nan_to_num(scores[i]))))
    in_circuit = {n for e in artifact.edges if e.in_circuit for n in (e.upstream, e.downstream)}
    half = NODE_WIDTH / 2
    for i in reversed(order[:DRAWN_EDGES]):  # the strongest drawn last, on top
        edge, score = artifact.edges[i], scores[i]
        if not np.isfinite(score) or strongest == 0:
            continue
        (x0, y0), (x1, y1) = xy[edge.upstream], xy[edge.downstream]
        ax.annotate("", (x1 - half, y1 + INPUT_OFFSET.get(edge.input, 0.0)), (x0 + half, y0), zorder=2 if edge.in_circuit else 1,
                    arrowprops=dict(arrowstyle="-", lw=0.4 + 4.5 * abs(score) / strongest,
                                    color=POSITIVE if score > 0 else NEGATIVE, alpha=0.85 if edge.in_circuit else 0.12,
                                    connectionstyle="arc3,rad=0.1", shrinkA=0, shrinkB=0))
    for name, (x, y) in xy.items():
        ax.add_patch(Rectangle((x - half, y - NODE_HEIGHT / 2), NODE_WIDTH, NODE_HEIGHT, facecolor="white", zorder=3,
                               edgecolor="black" if name in in_circuit else "#aaaaaa", lw=1.6 if name in in_circuit else 0.8))
        head = name.startswith("L") and not name.endswith("M")
        ax.text(x + (0.08 if head else 0), y, name, ha="center", va="center", fontsize=7, zorder=4)
        if head:
            for kind, offset in INPUT_OFFSET.items():
                ax.text(x - half + 0.05, y + offset, kind, ha="left", va="center", fontsize=5, color="#666666", zorder=4)
    ax.set_xlim(-half - 0.1, max(x for x, _ in xy.values()) + half + 0.1)
    ax.set_ylim(-(rows - 1) * ROW_GAP - NODE_HEIGHT, NODE_HEIGHT)
    ax.axis("off")


def plot_circuits(artifacts: list[CircuitArtifact], steps: list[int], path: Path) -> Figure:
    """The circuit at each of `steps`, side by side."""
    by_step = {a.step: a for a in artifacts}
    places = graph_columns(list(dict.fromkeys(["embed", "logits"] + [n for e in artifacts[-1].edges for n in (e.upstream, e.downstream)])))
    columns, rows = max(c for c, _ in places.values()) + 1, max(r for _, r in places.values()) + 1
    width, height = max(3.3, 0.8 * columns + 0.4), max(3.0, 0.45 * rows + 1.0)  # a bigger model gets a bigger panel
    fig, axes = plt.subplots(1, len(steps), figsize=(width * len(steps), height), squeeze=False, layout="constrained")
    for ax, step in zip(axes[0], steps):
        a = by_step[step]
        draw_circuit(ax, a)
        told = (f"{len(a.circuit)} edges, faithfulness {a.faithfulness:.2f}" if a.has_effect and a.circuit
                else "no clear clean/corrupt gap: no circuit")
        ax.set_title(f"step {step:,}\n{told}", fontsize=8)
    save_figure(fig, path)
    return Figure(path)


def top_edges(scores: pd.DataFrame, members: pd.DataFrame, n: int = TOP_EDGES) -> list[str]:
    """The `n` edges with the largest |score| at any step, final-circuit edges first."""
    final = members.iloc[-1] if len(members) else pd.Series(dtype=bool)
    peak = scores.abs().max().fillna(0.0)
    return sorted(peak.index, key=lambda e: (not bool(final.get(e, False)), -peak[e]))[:n]


def step_position(steps: list[int], step: float) -> float:
    """Where `step` falls on a heatmap's step axis (one column per measured step)."""
    return float(np.interp(step, steps, np.arange(len(steps))))


def plot_edge_heatmap(scores: pd.DataFrame, members: pd.DataFrame, edges: list[str], windows: pd.DataFrame,
                      path: Path) -> Figure:
    """Edge × step scores of `edges`, a dot where the edge is in that step's circuit, the headline windows marked."""
    steps = [int(s) for s in scores.index]
    values = scores[edges].to_numpy().T  # (edges, steps)
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(steps) + 3), 0.3 * len(edges) + 1.6))
    image = ax.imshow(values, aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound, interpolation="nearest")
    dots = members[edges].to_numpy().T  # (edges, steps)
    ys, xs = np.nonzero(dots)
    ax.scatter(xs, ys, s=6, color="black", label="in that step's circuit")
    for i, (_, t) in enumerate(windows.iterrows()):
        for j, edge in enumerate((t["start"], t["end"])):  # lines, not a fill: a tint would change the cells' colours
            ax.axvline(step_position(steps, edge), color=TRANSITION_COLOR, ls="--", lw=1.2,
                       label="headline transition window" if i == j == 0 else None)
    ax.set_yticks(range(len(edges)), edges, fontsize=7)
    shown = range(0, len(steps), max(1, len(steps) // 12))
    ax.set_xticks(list(shown), [f"{steps[i]:,}" for i in shown], fontsize=7, rotation=45)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label="score (metric change when the edge is patched)", pad=0.01)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    return save_tight(fig, path)


def plot_stability(stability: pd.DataFrame, sizes: pd.Series, windows: pd.DataFrame, path: Path) -> Figure:
    """Circuit size, Jaccard and weighted Jaccard with the previous and the final checkpoint (bootstrap bands)."""
    table = stability.pivot_table(index="step", columns="metric", values="value", dropna=False).sort_index()
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(sizes.index, sizes.to_numpy(), color="#303030", marker="o", ms=3, lw=1.2)
    axes[0].set_ylabel("circuit size (edges)")
    for ax, kind in zip(axes[1:], ("jaccard", "weighted_jaccard")):
        for name, color in (("prev", "#2060c0"), ("final", "#e08000")):
            metric = f"{kind}_{name}"
            if metric not in table:
                continue
            ax.plot(table.index, table[metric], color=color, marker="o", ms=3, lw=1.4,
                    label=f"with the {'previous' if name == 'prev' else 'final'} checkpoint")
            if f"{metric}_lo" in table and table[f"{metric}_lo"].notna().any():
                ax.fill_between(table.index, table[f"{metric}_lo"], table[f"{metric}_hi"], color=color, alpha=0.2, lw=0)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(kind.replace("_", " "))
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes:
        for _, t in windows.iterrows():
            mark_transition(ax, t.to_dict())
        ax.grid(alpha=0.25)
    axes[-1].set_xlabel("step")
    return save_tight(fig, path)


def where_in(step: int, windows: pd.DataFrame, spacing: int, label: str) -> str:
    """'inside the <label> 1,073–1,230', 'next to ...' (within one checkpoint spacing) or 'outside any <label>'."""
    for _, t in windows.iterrows():
        span = f"{int(t['start']):,}–{int(t['end']):,}"
        if t["start"] <= step <= t["end"]:
            return f"inside the {label} {span}"
        if t["start"] - spacing <= step < t["start"]:
            return f"one checkpoint before the {label} {span}"
        if t["end"] < step <= t["end"] + spacing:
            return f"one checkpoint after the {label} {span}"
    return f"outside every {label}" if len(windows) else "(the run has no headline transition to compare with)"


def births_text(births: list[Birth], windows: pd.DataFrame, spacing: int, label: str) -> str:
    """One sentence per clear birth, and what was left unclaimed."""
    clear = sorted((b for b in births if b.clear), key=lambda b: (b.step, -abs(b.final)))
    lines = [f"- `{b.edge}` is born at step {b.step:,}, {where_in(b.step, windows, spacing, label)} "
             f"(final score {b.final:+.3f} ± {b.final_se:.3f})." for b in clear]
    unclear = len(births) - len(clear)
    if unclear:
        lines.append(f"- {unclear} more edge{'s' if unclear > 1 else ''} of the final circuit "
                     f"{'have' if unclear > 1 else 'has'} a birth step but a final score within {BIRTH_SE:g} standard "
                     "errors of zero (or an artifact without the per-sequence split): no birth is claimed for "
                     f"{'them' if unclear > 1 else 'it'}.")
    if not births:
        return "No edge is born: the final checkpoint claims no circuit."
    intro = ("An edge's birth is the first checkpoint from which, at every later one, it is in the circuit and its score "
             "exceeds half its final score (same sign); a birth is told where the final score is more than "
             f"{BIRTH_SE:g} standard errors (over the sequences) from zero.")
    return intro + "\n\n" + "\n".join(lines)


def change_text(stability: pd.DataFrame, windows: pd.DataFrame, spacing: int, label: str) -> str:
    """Where the circuit changes most between adjacent checkpoints (lowest weighted Jaccard with the previous one)."""
    table = stability.pivot_table(index="step", columns="metric", values="value", dropna=False)
    if "weighted_jaccard_prev" not in table or table["weighted_jaccard_prev"].isna().all():
        return "No two adjacent checkpoints both claim a circuit: its stability cannot be told."
    step = int(table["weighted_jaccard_prev"].idxmin())
    value = table.loc[step, "weighted_jaccard_prev"]
    lo, hi = table.loc[step].get("weighted_jaccard_prev_lo"), table.loc[step].get("weighted_jaccard_prev_hi")
    others = table["weighted_jaccard_prev_lo"].drop(step).dropna() if "weighted_jaccard_prev_lo" in table else pd.Series()
    if lo is None or not np.isfinite(lo):
        return (f"The circuit changes most at step {step:,} (weighted Jaccard with the previous checkpoint {value:.2f}; "
                "no per-sequence split, so no interval and no claim).")
    beyond = len(others) and hi < others.median()
    return (f"The circuit changes most at step {step:,}, {where_in(step, windows, spacing, label)}: weighted Jaccard with "
            f"the previous checkpoint {value:.2f} ({100 * CONFIDENCE:.0f}% interval {lo:.2f}–{hi:.2f}), "
            + ("below the typical lower bound of the other steps' intervals." if beyond
               else "not clearly below the other steps' (its interval reaches their typical lower bound)."))


def agreement_table(agreement: pd.DataFrame) -> str:
    """Spearman of EAP and EAP-IG against exact per step (all edges)."""
    if agreement.empty:
        return ("Exact patching did not run beside EAP / EAP-IG here (`circuits.method=auto` runs all three where the "
                "graph has at most `exact_limit` edges), so their agreement is not measured.")
    table = agreement.pivot_table(index="step", columns="method", values="spearman", dropna=False).sort_index()
    methods = [m for m in ("eap", "eap_ig") if m in table]
    rows = ["| step | " + " | ".join(f"{METHOD_NAMES[m]} vs exact" for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for step, record in table.iterrows():
        rows.append(f"| {int(step):,} | " + " | ".join("–" if pd.isna(record[m]) else f"{record[m]:.2f}" for m in methods) + " |")
    return ("Spearman rank correlation over all edges of each estimate with exact patching, per step where both ran:\n\n"
            + "\n".join(rows))


def edge_transitions_text(transitions: pd.DataFrame, windows: pd.DataFrame, scores: pd.DataFrame) -> str:
    """Edge-score series whose detected transition overlaps a headline window and moves the edge by at least
    `MIN_EFFECT` of the largest |score| any edge reaches (each edge is its own series, so the detector's own effect
    test, against that edge's range, would also pass an edge that moves from 0.001 to 0.004)."""
    edges = transitions[transitions["metric"].str.startswith(EDGE_METRIC)] if len(transitions) else transitions
    if edges.empty or windows.empty:
        return ""
    scale = float(np.nanmax(np.abs(scores.to_numpy()))) if scores.size and np.isfinite(scores.to_numpy()).any() else 0.0
    lines = []
    for _, t in edges.sort_values("step").iterrows():
        if abs(t["after"] - t["before"]) < MIN_EFFECT * scale:
            continue
        if any(t["start"] <= w["end"] and w["start"] <= t["end"] for _, w in windows.iterrows()):
            lines.append(f"`{t['metric'][len(EDGE_METRIC):]}` {t['before']:+.2f} → {t['after']:+.2f} at step {int(t['step']):,} "
                         f"({int(t['start']):,}–{int(t['end']):,})")
    if not lines:
        return "No edge-score series has a detected transition overlapping a headline transition."
    return ("Edge scores are series like any metric (`edge:<edge>`, probe `circuits`); those with a detected transition "
            "overlapping a headline transition: " + "; ".join(lines) + ".")


@register_section
def circuits_section(run: Run, out: Path) -> str | None:
    """The circuits at key steps, the edge heatmap, the stability over training, births and method agreement."""
    heading = "## Circuits over training\n\n"
    artifacts = [a for a in circuit_artifacts(run) if a.step is not None]
    if not artifacts:
        if run.metrics(probe=PROBE).empty:
            return None
        return (heading + "This run has `circuits` rows but no per-edge artifacts (measured live between checkpoints, or "
                "by a phaselens that stored scalar rows only); the artifacts this section reads are written at every "
                f"checkpoint by `phaselens probe {run.path} --probes circuits --remeasure`.")
    steps = [a.step for a in artifacts]
    spacing = int(np.median(np.diff(steps))) if len(steps) > 1 else 0
    transitions = run.transitions(probe=PROBE)  # the edge-score series are the probe's own
    windows = run.headline_transitions()
    phenomenon = run.study.phenomenon
    label = f"{phenomenon.probe}/{phenomenon.metric} transition" if phenomenon else "headline transition"
    scores, members = edge_scores(artifacts), membership(artifacts)
    stability = circuit_stability(artifacts)
    births = edge_births(artifacts)
    sizes = pd.Series({a.step: len(a.circuit) if a.has_effect else np.nan for a in artifacts}).sort_index()
    shown = key_steps(steps, windows)
    figures = {
        "circuit_graphs": plot_circuits(artifacts, shown, out / "circuit_graphs.png"),
        "circuit_edges": plot_edge_heatmap(scores, members, top_edges(scores, members), windows, out / "circuit_edges.png"),
        "circuit_stability": plot_stability(stability, sizes, windows, out / "circuit_stability.png"),
    }
    method = METHOD_NAMES.get(artifacts[-1].circuit_method, artifacts[-1].circuit_method)
    captions = {
        "circuit_graphs": f"The circuit at steps {', '.join(f'{s:,}' for s in shown)}: nodes in layer columns, an edge enters "
                          "a head at its q, k or v input; width ∝ |score| (" + method + ") relative to the step's strongest "
                          "edge, blue where patching it raises the metric (it carries what lowers the loss), red where it "
                          "lowers it; circuit edges solid and their nodes outlined, other edges faint.",
        "circuit_edges": "The strongest edges' scores at every measured step (final-circuit edges first); a dot: in that "
                         "step's circuit; dashed: the headline transitions' windows.",
        "circuit_stability": f"Circuit size, and the Jaccard and weighted Jaccard (|score|-weighted) of the circuit with the "
                             f"previous and the final checkpoint; bands: {100 * CONFIDENCE:.0f}% bootstrap intervals over "
                             "the batch's sequences; shaded: the headline transitions.",
    }
    pairs = artifacts[-1].pairs
    claimed = sum(1 for a in artifacts if a.has_effect and a.circuit)
    intro = (f"Edge attribution at {len(artifacts)} checkpoints ({', '.join(METHOD_NAMES.get(m, m) for m in artifacts[-1].methods)}; "
             f"the circuit found with {method}): clean inputs against inputs with the `{pairs.get('patch')}` tokens "
             f"corrupted ({pairs.get('corrupt')}), the metric the loss at the `{pairs.get('read')}` predictions, on "
             f"{pairs.get('sequences')} sequences. The circuit is the smallest set of top edges whose faithfulness reaches "
             f"{artifacts[-1].threshold:g}; {claimed} of the {len(artifacts)} checkpoints claim one (the others show no clear "
             "clean/corrupt gap). Rows: `phaselens export` and `run.metrics(probe=\"circuits\")` (`edge:<edge>`, "
             "`jaccard_prev`, `jaccard_final` and their weighted forms with `_lo`/`_hi`, `edge_birth:<edge>`, "
             "`spearman_eap`, `spearman_eap_ig`); every score: `run.edges()`.")
    story = edge_transitions_text(transitions, windows, scores)
    return (heading + intro + "\n\n" + figures_section(figures, captions)
            + "\n\n### How stable the circuit is\n\n" + change_text(stability, windows, spacing, label)
            + "\n\n### Edge births\n\n" + births_text(births, windows, spacing, label)
            + (f"\n\n{story}" if story else "")
            + "\n\n### EAP and EAP-IG against exact patching\n\n" + agreement_table(method_agreement(artifacts)))
