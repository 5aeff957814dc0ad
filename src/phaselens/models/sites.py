"""Residual stream ℓ, defined once (torch-free, so the report can label figures without a model).

Stream 0 is the embeddings entering block 0, stream ℓ the output of block ℓ−1, stream L (the
last block's output) is what the unembedding reads, and L+1 is that stream after the final norm
(before its learned scale and bias). Logit lens, patching, geometry, the report and the
dashboard all index and label streams with these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

FINAL_NORM_HOOK = "ln_final.hook_normalized"


@dataclass(frozen=True)
class ResidualSite:
    """One residual stream: its index ℓ, the hook point that carries it, and how figures label it."""

    index: int
    hook: str
    label: str


def residual_sites(n_layers: int) -> tuple[ResidualSite, ...]:
    """Residual streams 0..n_layers of a transformer with TransformerLens hook names.

    The stream entering block ℓ > 0 is the output of block ℓ−1, so one hook serves both readings
    (`forward_from(stream ℓ, ℓ)` re-runs from exactly this stream).
    """
    return tuple(ResidualSite(index, hook, _label(index, n_layers)) for index, hook in enumerate(
        ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]))


def final_norm_site(n_layers: int) -> ResidualSite:
    """Stream L+1: the last block's output after the final norm."""
    return ResidualSite(n_layers + 1, FINAL_NORM_HOOK, _label(n_layers + 1, n_layers))


def residual_label(index: int, n_layers: int) -> str:
    """How a figure names stream `index` of a model with `n_layers` blocks: "0: embeddings", "2: after block 1 (output)"."""
    return f"{index}: {_label(index, n_layers)}"


def _label(index: int, n_layers: int) -> str:
    if index == 0:
        return "embeddings"
    if index == n_layers + 1:
        return "after the final norm"
    return f"after block {index - 1}" + (" (output)" if index == n_layers else "")
