"""Attention-pattern statistics: entropy, coherence (σ_p), specialization (σ_a), head variance.

Each formula lives here once and serves live telemetry, post-hoc sweeps and the function API.
Patterns are (..., Q, K) softmax rows of a causal model, so query q may attend to keys 0..q.
Live telemetry runs these every training step, so the formulas that share a pass over the
pattern share a function (entropy and coherence; specialization and head variance) and use
few, batched tensor operations: each costs about as much in dispatch as in arithmetic here.
"""

from __future__ import annotations

import functools

import torch

from phaselens.models.adapter import ModelAdapter
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe


def allowed_keys(n_queries: int, n_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """Number of keys each causal query may attend to: (Q,) = 1, 2, ..., Q (for Q == K)."""
    offset = n_keys - n_queries
    return torch.arange(1, n_queries + 1, device=device) + offset


@functools.lru_cache(maxsize=32)
def _entropy_weights(n_batch: int, n_queries: int, n_keys: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(Q, 2) weights taking Σ_k p log p of each row to its share of [mean H, mean H/log n_keys(q)]."""
    with torch.inference_mode(False):  # cached across calls: must stay usable outside inference mode
        log_keys = allowed_keys(n_queries, n_keys, device).to(dtype).log()  # (Q,)
        weights = torch.stack([torch.ones_like(log_keys), 1 / log_keys], dim=-1)  # (Q, 2)
        weights[0] = 0  # query 0 has a single allowed key and is left out of both means
        return weights / -(n_batch * (n_queries - 1))  # H = −Σ p log p, averaged over (b, q >= 1)


def entropy_and_coherence(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean row entropy H (nats) and σ_p = 1 − H(q)/log n_keys(q) per head, over batch and queries q >= 1.

    (..., B, H, Q, K) -> ((..., H), (..., H)). Each row is normalised by its own number of allowed
    keys (not by T). Coherence 1: every query attends to a single key; 0: uniform attention.
    """
    B, Q, K = pattern.shape[-4], pattern.shape[-2], pattern.shape[-1]
    # p·log(max(p, tiny)) is exactly 0 where p = 0, and 3x faster than torch.special.xlogy on CPU.
    plogp = pattern.clamp_min(torch.finfo(pattern.dtype).tiny).log_().mul_(pattern)  # one temporary, in place
    weights = _entropy_weights(B, Q, K, pattern.device, pattern.dtype)  # (Q, 2)
    entropy, normalised = (plogp.sum(-1) @ weights).sum(-3).unbind(-1)  # (..., H) each, averaged over (b, q >= 1)
    return entropy, 1 - normalised


def attention_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """Mean row entropy per head over batch and query positions q >= 1: (..., B, H, Q, K) -> (..., H)."""
    return entropy_and_coherence(pattern)[0]


def attention_coherence(pattern: torch.Tensor) -> torch.Tensor:
    """σ_p = 1 − H(q)/log n_keys(q), averaged like the entropy; each row uses its own key count.

    (..., B, H, Q, K) -> (..., H). 1: every query attends to a single key; 0: uniform attention.
    """
    return entropy_and_coherence(pattern)[1]


@functools.lru_cache(maxsize=32)
def _centering(n_heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, H) = I − 1/H: applied to the heads of a row, it subtracts their mean."""
    with torch.inference_mode(False):  # cached across calls: must stay usable outside inference mode
        return torch.eye(n_heads, device=device, dtype=dtype) - 1 / n_heads


def deviation_from_mean_head(pattern: torch.Tensor) -> torch.Tensor:
    """P_h(q) − P̄(q), with P̄ the mean row over heads: (..., B, H, Q, K) -> same shape."""
    H, Q, K = pattern.shape[-3:]
    rows = pattern.reshape(-1, H, Q * K)  # (N, H, Q·K)
    # One batched (H, H) @ (H, Q·K) product reads the pattern once; mean-then-subtract reads it twice.
    centering = _centering(H, pattern.device, pattern.dtype).expand(rows.shape[0], H, H)
    return torch.bmm(centering, rows).view(pattern.shape)


def specialization_and_variance(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """σ_a per layer and per head, and the head variance, from one pass of deviations from the mean head.

    (..., B, H, Q, K) -> (per layer (...), per head (..., H), head variance (...)).
    σ_a per head: mean over (batch, query) of the total-variation distance ½‖P_h(q) − P̄(q)‖₁, in
    [0, 1]; per layer: the mean over heads. Head variance: mean over (batch, query, key) of the
    population variance of P across heads.
    """
    B, H, Q, K = pattern.shape[-4:]
    deviation = deviation_from_mean_head(pattern)
    rows = deviation.view(-1, H, Q * K)  # (N, H, Q·K)
    # Σ_h Σ_(q,k) (P_h − P̄)² is the trace of each (H, H) Gram matrix: one read, no temporary.
    squares = torch.bmm(rows, rows.transpose(1, 2)).diagonal(dim1=-2, dim2=-1).sum(-1)  # (N,) = (..., B) flattened
    variance = squares.view(*pattern.shape[:-4], B).sum(-1) / (B * H * Q * K)  # (...)
    magnitude = deviation.abs() if deviation.requires_grad else deviation.abs_()  # the Gram product saved it for autograd
    per_head = magnitude.view(*pattern.shape[:-2], Q * K).sum((-3, -1)) * (0.5 / (B * Q))  # (..., H)
    return per_head.sum(-1) / H, per_head, variance


def attention_specialization(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_a: total-variation distance of each head's rows from the layer's mean row, in [0, 1].

    (..., B, H, Q, K) -> (per layer (...), per head (..., H)). The per-layer value is the mean
    over (batch, query) of the mean over heads; per head, that head's mean over (batch, query).
    """
    per_layer, per_head, _ = specialization_and_variance(pattern)
    return per_layer, per_head


def attention_head_variance(pattern: torch.Tensor) -> torch.Tensor:
    """Older σ_a: mean over (batch, query, key) of the population variance of P across heads.

    (..., B, H, Q, K) -> (...).
    """
    return specialization_and_variance(pattern)[2]


@register_probe
class AttentionProbe(Probe):
    """Per-head entropy and coherence, per-layer (and per-head) specialization, per-layer head variance."""

    name = "attention"
    needs = Needs(parts=frozenset({"attention_patterns"}))
    option_names = ()
    off_thread = True  # reads activations and the batch only

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        return [adapter.pattern_hook(layer) for layer in range(adapter.n_layers)]

    PATTERN_SCALE = 10_000

    def artifact(self, inputs: ProbeInputs) -> dict:
        """The attention pattern of the first probe sequence, per layer and head, with its tokens.

        Probabilities are stored as integers in units of 1/`scale` (1e-4): JSON writes integers
        about five times faster than floats, and the files are smaller. patterns / scale gives them back.
        """
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")[:, 0]  # (L, H, Q, K)
        return {
            "tokens": inputs.batch.tokens[0].tolist(),
            "scale": self.PATTERN_SCALE,
            "patterns": (patterns.float() * self.PATTERN_SCALE).round().int().tolist(),  # [layer][head][query][key]
        }

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        entropy, coherence = entropy_and_coherence(patterns)  # (L, H) each
        per_layer, per_head, variance = specialization_and_variance(patterns)  # (L,), (L, H), (L,)
        return [
            Measurement("entropy", entropy),
            Measurement("coherence", coherence),
            Measurement("specialization", per_layer),
            Measurement("specialization", per_head),
            Measurement("head_variance", variance),
        ]
