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


def attention_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """Mean row entropy per head over batch and query positions q >= 1: (..., B, H, Q, K) -> (..., H)."""
    return row_entropy(pattern)[..., 1:].mean(dim=(-3, -1))


def attention_coherence(pattern: torch.Tensor) -> torch.Tensor:
    """σ_p = 1 − H(q)/log n_keys(q), averaged like the entropy; each row uses its own key count.

    (..., B, H, Q, K) -> (..., H). 1: every query attends to a single key; 0: uniform attention.
    """
    Q, K = pattern.shape[-2:]
    log_keys = allowed_keys(Q, K, pattern.device).to(pattern.dtype).log()  # (Q,)
    coherence = 1 - row_entropy(pattern)[..., 1:] / log_keys[1:]  # (..., B, H, Q-1)
    return coherence.mean(dim=(-3, -1))


def head_tv_from_mean(pattern: torch.Tensor) -> torch.Tensor:
    """½‖P_h(q) − P̄(q)‖₁ with P̄ the mean row over heads: (..., B, H, Q, K) -> (..., B, H, Q)."""
    mean_row = pattern.mean(dim=-3, keepdim=True)  # (..., B, 1, Q, K)
    return 0.5 * (pattern - mean_row).abs().sum(-1)


def attention_specialization(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_a: total-variation distance of each head's rows from the layer's mean row, in [0, 1].

    (..., B, H, Q, K) -> (per layer (...), per head (..., H)). The per-layer value is the mean
    over (batch, query) of the mean over heads; per head, that head's mean over (batch, query).
    """
    per_head = head_tv_from_mean(pattern).mean(dim=(-3, -1))  # (..., H)
    return per_head.mean(-1), per_head


def attention_head_variance(pattern: torch.Tensor) -> torch.Tensor:
    """Older σ_a: mean over (batch, query, key) of the population variance across heads.

    (..., B, H, Q, K) -> (...).
    """
    deviation = pattern - pattern.mean(dim=-3, keepdim=True)  # (..., B, H, Q, K)
    # Written out: torch.var over a strided middle dim is ~50x slower on CPU.
    return deviation.square().mean(dim=(-4, -3, -2, -1))


@register_probe
class AttentionProbe(Probe):
    """Per-head entropy and coherence, per-layer (and per-head) specialization, per-layer head variance."""

    name = "attention"

    def hook_names(self, n_layers: int) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        per_layer, per_head = attention_specialization(patterns)  # (L,), (L, H)
        return [
            Measurement("entropy", attention_entropy(patterns)),
            Measurement("coherence", attention_coherence(patterns)),
            Measurement("specialization", per_layer),
            Measurement("specialization", per_head),
            Measurement("head_variance", attention_head_variance(patterns)),
        ]
