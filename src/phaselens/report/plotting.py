"""What every report figure shares: the matplotlib backend, one metric's rows as tables, labels,
the transition marker and saving at the report's resolution. Study modules draw with these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the report also runs on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from phaselens.models.sites import residual_label  # noqa: E402

DPI = 110
TRANSITION_COLOR = "#b03030"

@dataclass
class Figure:
    """One written PNG (path None when nothing could be drawn) and what it had to leave out."""

    path: Path | None
    missing: list[str] = field(default_factory=list)


def head_label(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def stream_label(layer: int, n_layers: int) -> str:
    """Residual stream ℓ of the logit lens and of patching: 0 = embeddings, ℓ = after block ℓ−1."""
    return residual_label(layer, n_layers)


def metric_rows(metrics: pd.DataFrame, probe: str, metric: str) -> pd.DataFrame:
    """The rows of one (probe, metric) of a metrics frame, in step order."""
    return metrics[(metrics["probe"] == probe) & (metrics["metric"] == metric)].sort_values("step")


def per_head_table(frame: pd.DataFrame) -> pd.DataFrame:
    """A step × (layer, head) table of a per-head metric."""
    heads = frame[frame["layer"].notna() & frame["head"].notna()]
    return heads.pivot_table(index="step", columns=["layer", "head"], values="value").sort_index()


def per_layer_table(frame: pd.DataFrame) -> pd.DataFrame:
    """A step × layer table of a per-layer metric."""
    rows = frame[frame["layer"].notna() & frame["head"].isna()]
    return rows.pivot_table(index="step", columns="layer", values="value").sort_index()


def mark_transition(ax, transition: dict | None) -> None:
    """A transition on an axis: a line at its steepest step over a shaded 10–90% window."""
    if transition is None:
        return
    ax.axvspan(transition["start"], transition["end"], color=TRANSITION_COLOR, alpha=0.1, lw=0)
    ax.axvline(transition["step"], color=TRANSITION_COLOR, ls="--", lw=1)


def save_figure(fig, path: Path) -> None:
    """Saved at the report's resolution and closed (the layout as the caller left it)."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def save_tight(fig, path: Path) -> Figure:
    """Tight layout, saved at the report's resolution and closed: the report figure at `path`."""
    fig.tight_layout()
    save_figure(fig, path)
    return Figure(path)
