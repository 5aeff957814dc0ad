"""The sparse-neuron report: `neurons.md`, a stdout summary and `neurons.png`, from the neuron artifact.

Torch-free and plot-free at import: the text report needs neither, and the figure is drawn
only when matplotlib can be imported.
"""

from __future__ import annotations

import math
from pathlib import Path
from phaselens.store.neuron_artifact import MIN_FIRING_TOKENS, NeuronArtifact, NeuronContext

NEWLINE = "↵"
TAB = "⇥"


def visible(text: str) -> str:
    """Newlines and tabs made visible, and nothing that breaks a markdown table cell."""
    return text.replace("\n", NEWLINE).replace("\t", TAB).replace("\r", "␍").replace("|", "¦").replace("`", "'")


def _pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _num(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def layer_table(data: NeuronArtifact) -> str:
    quantiles = list(data.layers[0].summary["rate_quantiles"]) if data.layers else []
    head = ["layer", "neurons", "mean firing rate", *[f"rate q{float(q):g}" for q in quantiles],
            "rare (<1%)", "dead", "median selectivity"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in data.layers:
        s = layer.summary
        cells = [str(layer.layer), str(layer.n_neurons), _pct(s["firing_rate_mean"]),
                 *[_pct(s["rate_quantiles"][q]) for q in quantiles], _pct(s["frac_rare"]), _pct(s["frac_dead"]),
                 _num(s["selectivity_median"])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_lines(data: NeuronArtifact) -> list[str]:
    """One line per layer, for stdout."""
    lines = [f"{data.tokens:,} tokens of {data.source}; firing = value > {data.threshold:g}"]
    for layer in data.layers:
        s = layer.summary
        lines.append(
            f"layer {layer.layer} ({layer.hook}, {layer.n_neurons} neurons): mean firing rate {_pct(s['firing_rate_mean'])}, "
            f"rare (<1% of tokens) {_pct(s['frac_rare'])}, dead {_pct(s['frac_dead'])}, median selectivity {_num(s['selectivity_median'])}"
        )
    return lines


def context_line(entry: NeuronContext) -> str:
    return f"{visible(entry.before)}[{visible(entry.token)}]{visible(entry.after)}"


def top_contexts_section(data: NeuronArtifact, per_layer: int = 4, contexts: int = 3) -> str:
    parts = []
    for layer in data.layers:
        for item in layer.most_selective[:per_layer]:
            lines = [f"**L{layer.layer} neuron {item.neuron}**: fires on {_pct(item.firing_rate)} of tokens, "
                     f"selectivity {item.selectivity:.1f}"]
            for entry in item.contexts[:contexts]:
                lines.append(f"- `{entry.value:.3g}` `{context_line(entry)}`")
            parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "No neuron fired often enough to show contexts."


def markdown(data: NeuronArtifact, figure: Path | None) -> str:
    sections = [
        "# Sparse neurons" + (f" at step {data.step}" if data.step is not None else ""),
        "\n".join(summary_lines(data)),
        "## Per layer\n\n" + layer_table(data) + "\n\nRare neurons fire on fewer than 1% of tokens (dead ones included); "
        "selectivity is max / mean over all tokens, its median taken over neurons that fired.",
        f"## Most selective neurons and their strongest contexts\n\nAmong neurons that fired on at least "
        f"{max(MIN_FIRING_TOKENS, data.top_k)} tokens (rarer ones' max / mean rests on a few values near the threshold). Each context shows {data.window} tokens before the activating token "
        f"[in brackets] and a few after; {NEWLINE} is a newline.\n\n" + top_contexts_section(data),
    ]
    if figure is not None:
        sections.append(f"## Figure\n\n![neurons]({figure.name})\n\n*Per layer: firing rates (log scale) and "
                        "selectivity of the neurons that fired.*")
    else:
        sections.append("No figure: matplotlib is not installed (`pip install matplotlib` to draw neurons.png).")
    return "\n\n".join(sections) + "\n"


def plot_neurons(data: NeuronArtifact, path: Path) -> Path | None:
    """Firing-rate and selectivity histograms per layer; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    layers = data.layers
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 5.2), squeeze=False)
    tokens = max(1, data.tokens)
    for column, layer in enumerate(layers):
        rate = np.asarray([v if v is not None else 0.0 for v in layer.firing_rate], dtype=float)
        floor = 1.0 / tokens
        ax = axes[0, column]
        ax.hist(np.log10(np.clip(rate, floor / 2, 1)), bins=40, color="#3060a0")
        ax.axvline(-2, color="#b03030", ls="--", lw=1)
        ax.set_title(f"layer {layer.layer}", fontsize=10)
        ax.set_xlabel("log10 firing rate (dashed: 1%)", fontsize=8)
        sel = np.asarray([v for v in layer.selectivity if v is not None], dtype=float)
        positive = sel[sel > 0]  # max/mean has no logarithm where a neuron's mean is negative (GELU outputs can be)
        ax = axes[1, column]
        if len(positive):
            ax.hist(np.log10(positive), bins=40, color="#308050")
        left_out = len(sel) - len(positive)
        ax.set_xlabel("log10 selectivity (max/mean)" + (f"; {left_out} with mean ≤ 0 not shown" if left_out else ""), fontsize=8)
    axes[0, 0].set_ylabel("neurons")
    axes[1, 0].set_ylabel("neurons")
    fig.suptitle(f"Neuron activity over {data.tokens:,} tokens", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_neuron_report(data: NeuronArtifact, out: Path) -> tuple[Path, Path | None]:
    """Write neurons.md (and neurons.png when matplotlib is there) into `out`; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_neurons(data, out / "neurons.png")
    path = out / "neurons.md"
    path.write_text(markdown(data, figure))
    return path, figure
