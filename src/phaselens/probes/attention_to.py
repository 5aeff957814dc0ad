"""Attention mass from a set of query positions to a set of key positions, per head.

Sets are the task's named position sets (for induction: from the copy predictions to the segment
they copy; for disambiguation: from the first-target prediction to the z tokens) or explicit
positions from the user.
"""

from __future__ import annotations

from typing import Sequence

import torch

from phaselens.models.adapter import ModelAdapter
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
from phaselens.tasks.batch import TaskBatch


def attention_mass(pattern: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, selected queries) of Σ_{k ∈ keys} A[q, k].

    pattern (..., B, H, Q, K), queries (B, Q) bool, keys (B, K) bool -> (..., H).
    """
    mass = pattern @ keys.to(pattern.dtype)[:, None, :, None]  # (..., B, H, Q, 1)
    weights = queries.to(pattern.dtype)  # (B, Q)
    return (mass[..., 0] * weights[:, None]).sum(dim=(-3, -1)) / weights.sum()


def position_mask(batch: TaskBatch, spec: str | Sequence[int], what: str) -> torch.Tensor:
    """(B, T) bool from a position set's name ('copy', 'source', 'z', ...) or explicit positions.

    A prediction set marks the query that makes each prediction (prediction t is made at query t).
    """
    if isinstance(spec, str):
        return batch.token_positions(spec, f"attention_to {what}")
    B, T = batch.tokens.shape
    mask = torch.zeros(B, T, dtype=torch.bool, device=batch.tokens.device)
    mask[:, list(spec)] = True
    return mask


@register_probe
class AttentionToProbe(Probe):
    """`mass` per head from `query` positions to `key` positions (the task's position sets by name, or position lists).

    The task declares which sets: copy → source for induction, first_target → z (the prediction of the
    first target token attending to the selector) for late disambiguation.
    """

    name = "attention_to"
    needs = Needs(parts=frozenset({"attention_patterns"}), position_options=("query", "key"), batch="induction", live=False)

    def __init__(self, query: str | Sequence[int] | None = None, key: str | Sequence[int] | None = None):
        super().__init__(query=query, key=key)

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        return [adapter.pattern_hook(layer) for layer in range(adapter.n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        query, key = self.options["query"], self.options["key"]
        if query is None or key is None:
            raise ValueError("attention_to needs options query and key (position sets or position lists); this task "
                             "declares none: set them, e.g. --probe-option attention_to.query=copy")
        queries = position_mask(inputs.batch, query, "query")
        keys = position_mask(inputs.batch, key, "key")
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        return [Measurement("mass", attention_mass(patterns, queries, keys))]
