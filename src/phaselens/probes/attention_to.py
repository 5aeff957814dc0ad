"""Attention mass from a set of query positions to a set of key positions, per head.

Sets come from the task's masks (for induction: from the copy positions to the segment they
copy; for disambiguation: from the first-target prediction position to the z tokens) or
from the user as explicit positions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe
from phaselens.tasks.batch import TaskBatch


def attention_mass(pattern: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, selected queries) of Σ_{k ∈ keys} A[q, k].

    pattern (..., B, H, Q, K), queries (B, Q) bool, keys (B, K) bool -> (..., H).
    """
    mass = pattern @ keys.to(pattern.dtype)[:, None, :, None]  # (..., B, H, Q, 1)
    weights = queries.to(pattern.dtype)  # (B, Q)
    return (mass[..., 0] * weights[:, None]).sum(dim=(-3, -1)) / weights.sum()


def position_mask(batch: TaskBatch, spec: str | Sequence[int], what: str) -> torch.Tensor:
    """(B, T) bool from a batch mask name ('copy', 'source', ...) or explicit positions."""
    B, T = batch.tokens.shape
    if isinstance(spec, str):
        mask = getattr(batch, f"{spec}_mask", None)
        if mask is None:
            raise ValueError(f"attention_to {what}={spec!r}: this task's batch has no {spec}_mask")
        if mask.shape[1] == T - 1:  # prediction positions: position t predicts token t+1, its query is t
            mask = torch.cat([mask, torch.zeros(B, 1, dtype=torch.bool, device=mask.device)], dim=1)
        return mask
    mask = torch.zeros(B, T, dtype=torch.bool, device=batch.tokens.device)
    mask[:, list(spec)] = True
    return mask


@register_probe
class AttentionToProbe(Probe):
    """`mass` per head from `query` positions to `key` positions (task masks by name, or position lists).

    By default it follows the task: copy → source for induction, first_target → selector (the prediction
    of the first target token attending to z) for late disambiguation.
    """

    name = "attention_to"
    live = False

    def __init__(self, query: str | Sequence[int] = "copy", key: str | Sequence[int] = "source"):
        super().__init__(query=query, key=key)

    def hook_names(self, n_layers: int) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        batch = inputs.batch
        query, key = self.options["query"], self.options["key"]
        if query == "copy" and key == "source" and batch.source_mask is None:
            if batch.first_target_mask is None or batch.selector_mask is None:
                return []  # a task without segment or selector metadata: nothing to measure by default
            query, key = "first_target", "selector"
        queries = position_mask(batch, query, "query")
        keys = position_mask(batch, key, "key")
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        return [Measurement("mass", attention_mass(patterns, queries, keys))]
