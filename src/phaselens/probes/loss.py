"""Losses on the probe batch: per-position cross-entropy split by the task's masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.disambiguation import roll_selectors


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


def first_target_losses(model: torch.nn.Module, losses: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """`first_target`, `z_shuffled` and `z_shuffle_gap` of a disambiguation batch: (3,), or (1,) without selectors.

    `z_shuffled` is the first-target loss when every row's z is replaced by the next row's (a derangement of
    the rows), measured with one extra no-grad forward; the gap is how much the model relies on z.
    `losses` (B, T-1) are the clean run's per-position losses.
    """
    clean = masked_mean(losses, batch.first_target_mask)
    if batch.selector_mask is None:
        return clean[None]
    shuffled_logits = model(roll_selectors(batch.tokens, batch.selector_mask))  # (B, T, V)
    shuffled = masked_mean(token_losses(shuffled_logits, batch.tokens), batch.first_target_mask)
    return torch.stack((clean, shuffled, shuffled - clean))


@register_probe
class LossProbe(Probe):
    """Loss of the measured batch: `all` positions, `copy` / `non_copy` where the task marks copies, and
    `first_target`, `z_shuffled`, `z_shuffle_gap` where it marks a first target (late disambiguation).

    The trainer adds `train` (the full training batch) and `eval` (the held-out batch).
    """

    name = "loss"
    needs_logits = True
    off_thread = True

    def runs_off_thread(self, batch: TaskBatch) -> bool:
        return batch.first_target_mask is None  # the z-shuffled loss runs the model: measure it in step

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        batch = inputs.batch
        losses = token_losses(inputs.logits, batch.tokens)  # (B, T-1)
        if batch.first_target_mask is not None:
            values = first_target_losses(inputs.model, losses, batch)
            names = ("first_target", "z_shuffled", "z_shuffle_gap")
            return [Measurement("all", masked_mean(losses, batch.loss_mask))] + [
                Measurement(name, value) for name, value in zip(names, values.unbind())]
        if batch.copy_mask is None:
            return [Measurement("all", masked_means(losses, batch.loss_mask[None])[0])]
        # The three masks as 0/1 rows of one tensor: counted, counted ∧ copy, counted ∧ ¬copy.
        counted = batch.loss_mask.to(losses.dtype)  # (B, T-1)
        copies = batch.copy_mask.to(losses.dtype).mul_(counted)
        means = masked_means(losses, torch.cat((counted, copies, counted - copies)).view(3, *losses.shape))  # (3,)
        return [Measurement(name, mean) for name, mean in zip(("all", "copy", "non_copy"), means.unbind())]
