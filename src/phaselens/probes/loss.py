"""Losses on the probe batch: per-position cross-entropy split by the task's masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position: logits (B, T, V), tokens (B, T) -> (B, T-1)."""
    B, T, V = logits.shape
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(B, T - 1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is set (NaN when it is set nowhere)."""
    return masked_means(values, mask[None])[0]


def masked_means(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Means of `values` (...) under each of S masks (S, ...), bool or 0/1, in one matmul: -> (S,)."""
    weights = masks.reshape(masks.shape[0], -1).to(values.dtype)  # (S, N)
    return (weights @ values.reshape(-1, 1)).view(-1) / weights.sum(-1)


@register_probe
class LossProbe(Probe):
    """Loss of the measured batch: `all` positions, and `copy` / `non_copy` where the task marks copies.

    The trainer adds `train` (the full training batch) and `eval` (the held-out batch).
    """

    name = "loss"
    needs_logits = True

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        batch = inputs.batch
        losses = token_losses(inputs.logits, batch.tokens)  # (B, T-1)
        if batch.copy_mask is None:
            return [Measurement("all", masked_means(losses, batch.loss_mask[None])[0])]
        # The three masks as 0/1 rows of one tensor: counted, counted ∧ copy, counted ∧ ¬copy.
        counted = batch.loss_mask.to(losses.dtype)  # (B, T-1)
        copies = batch.copy_mask.to(losses.dtype).mul_(counted)
        means = masked_means(losses, torch.cat((counted, copies, counted - copies)).view(3, *losses.shape))  # (3,)
        return [Measurement(name, mean) for name, mean in zip(("all", "copy", "non_copy"), means.unbind())]
