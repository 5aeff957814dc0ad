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
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


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
        out = [Measurement("all", masked_mean(losses, batch.loss_mask))]
        if batch.copy_mask is not None:
            out.append(Measurement("copy", masked_mean(losses, batch.copy_mask & batch.loss_mask)))
            out.append(Measurement("non_copy", masked_mean(losses, ~batch.copy_mask & batch.loss_mask)))
        return out
