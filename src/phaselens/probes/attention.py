"""Attention-pattern statistics: entropy, coherence (σ_p), specialization (σ_a), head variance.

Each formula lives here once and serves live telemetry, post-hoc sweeps and the function API.
Patterns are (..., Q, K) softmax rows of a causal model, so query q may attend to keys 0..q.
"""

from __future__ import annotations

import torch

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe


def allowed_keys(n_queries: int, n_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """Number of keys each causal query may attend to: (Q,) = 1, 2, ..., Q (for Q == K)."""
    offset = n_keys - n_queries
    return torch.arange(1, n_queries + 1, device=device) + offset


def row_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """H = −Σ_k p log p per attention row (nats): (..., Q, K) -> (..., Q). Masked keys have p = 0."""
    return -torch.special.xlogy(pattern, pattern).sum(-1)


def entropy_from_rows(entropy_rows: torch.Tensor) -> torch.Tensor:
    """Mean over batch and queries q >= 1 of row entropies: (..., B, H, Q) -> (..., H)."""
    return entropy_rows[..., 1:].mean(dim=(-3, -1))


def coherence_from_rows(entropy_rows: torch.Tensor, n_keys: int) -> torch.Tensor:
    """σ_p = 1 − H(q)/log n_keys(q) averaged like the entropy: (..., B, H, Q) -> (..., H)."""
    Q = entropy_rows.shape[-1]
    log_keys = allowed_keys(Q, n_keys, entropy_rows.device).to(entropy_rows.dtype).log()[1:]  # (Q-1,)
    return (1 - entropy_rows[..., 1:] / log_keys).mean(dim=(-3, -1))


def attention_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """Mean row entropy per head over batch and query positions q >= 1: (..., B, H, Q, K) -> (..., H)."""
    return entropy_from_rows(row_entropy(pattern))


def attention_coherence(pattern: torch.Tensor) -> torch.Tensor:
    """σ_p = 1 − H(q)/log n_keys(q), averaged like the entropy; each row uses its own key count.

    (..., B, H, Q, K) -> (..., H). 1: every query attends to a single key; 0: uniform attention.
    """
    return coherence_from_rows(row_entropy(pattern), pattern.shape[-1])


def deviation_from_mean_head(pattern: torch.Tensor) -> torch.Tensor:
    """P_h(q) − P̄(q), with P̄ the mean row over heads: (..., B, H, Q, K) -> same shape."""
    return pattern - pattern.mean(dim=-3, keepdim=True)


def specialization_from_deviation(deviation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """½‖P_h − P̄‖₁ averaged over (batch, query): (..., B, H, Q, K) -> (per layer (...), per head (..., H))."""
    per_head = (0.5 * deviation.abs().sum(-1)).mean(dim=(-3, -1))  # (..., H)
    return per_head.mean(-1), per_head


def variance_from_deviation(deviation: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, query, key) of the population variance across heads: (..., B, H, Q, K) -> (...)."""
    return deviation.square().mean(dim=(-4, -3, -2, -1))


def attention_specialization(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_a: total-variation distance of each head's rows from the layer's mean row, in [0, 1].

    (..., B, H, Q, K) -> (per layer (...), per head (..., H)). The per-layer value is the mean
    over (batch, query) of the mean over heads; per head, that head's mean over (batch, query).
    """
    return specialization_from_deviation(deviation_from_mean_head(pattern))


def attention_head_variance(pattern: torch.Tensor) -> torch.Tensor:
    """Older σ_a: mean over (batch, query, key) of the population variance of P across heads.

    (..., B, H, Q, K) -> (...).
    """
    return variance_from_deviation(deviation_from_mean_head(pattern))


@register_probe
class AttentionProbe(Probe):
    """Per-head entropy and coherence, per-layer (and per-head) specialization, per-layer head variance."""

    name = "attention"

    def hook_names(self, n_layers: int) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        entropy_rows = row_entropy(patterns)  # (L, B, H, Q), shared by entropy and coherence
        deviation = deviation_from_mean_head(patterns)  # shared by specialization and head variance
        per_layer, per_head = specialization_from_deviation(deviation)  # (L,), (L, H)
        return [
            Measurement("entropy", entropy_from_rows(entropy_rows)),
            Measurement("coherence", coherence_from_rows(entropy_rows, patterns.shape[-1])),
            Measurement("specialization", per_layer),
            Measurement("specialization", per_head),
            Measurement("head_variance", variance_from_deviation(deviation)),
        ]
