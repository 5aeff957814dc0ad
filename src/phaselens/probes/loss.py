"""Losses on the probe batch: per-position cross-entropy on the task's named prediction sets."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
from phaselens.tasks.batch import TaskBatch


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


def icl_score(losses: torch.Tensor, mask: torch.Tensor, late: int = 500, early: int = 50) -> torch.Tensor | None:
    """In-context-learning score (Olsson et al. 2022): mean loss of token `late` minus mean loss of token `early`.

    Token indices count from 0, so token k's loss is the prediction at position k−1. Both indices are
    clipped to the context (the last token is T−1); None when fewer than two distinct indices remain.
    Negative when later tokens, which see more context, are predicted better.
    losses (B, T-1), mask (B, T-1) -> ().
    """
    last = losses.shape[1]  # the last token index, T-1
    late, early = min(late, last), min(early, last)
    if early >= late or early < 1:
        return None
    picks = torch.zeros(2, *mask.shape, dtype=losses.dtype, device=losses.device)  # (2, B, T-1)
    picks[0, :, late - 1], picks[1, :, early - 1] = 1, 1
    late_loss, early_loss = masked_means(losses, picks * mask.to(losses.dtype)).unbind()
    return late_loss - early_loss


@register_probe
class LossProbe(Probe):
    """Loss of the measured batch: `all` counted positions, and the loss on the task's named prediction sets.

    Options (a task declares its defaults; see `phaselens.tasks.study`):
        positions: prediction sets whose loss is reported under their own name (induction: `copy`).
        complements: prediction sets whose complement within the loss mask is reported as `non_<set>`.
        shuffle: a token set (the selector `z`): the loss at the first of `positions` is measured again with
            that set moved one row on (a derangement of the rows), as `<set>_shuffled`, and
            `<set>_shuffle_gap` = shuffled − clean: how much the model relies on it. This costs one extra
            no-grad forward, shared with the `random_z` probe.
        icl_score: also report `icl_score` (text studies), the loss of token `icl_late` minus that of
            token `icl_early` (see `icl_score`).

    The trainer adds `train` (the full training batch) and `eval` (the held-out batch).
    """

    name = "loss"
    needs = Needs(optional_sets=("positions", "complements", "shuffle"))
    needs_logits = True
    off_thread = True

    def __init__(self, positions: Sequence[str] = (), complements: Sequence[str] = (), shuffle: str | None = None,
                 icl_score: bool = False, icl_late: int = 500, icl_early: int = 50):
        if shuffle and not positions:
            raise ValueError("loss shuffle needs a prediction set in `positions` to read the shuffled loss at")
        if not 1 <= icl_early < icl_late:
            raise ValueError(f"loss icl_early and icl_late must satisfy 1 <= icl_early < icl_late, got {icl_early} and {icl_late}")
        super().__init__(positions=list(positions), complements=list(complements), shuffle=shuffle or None,
                         icl_score=icl_score, icl_late=icl_late, icl_early=icl_early)

    def runs_off_thread(self, batch: TaskBatch) -> bool:
        return self.options["shuffle"] is None  # the shuffled loss runs the model: measure it in step

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        batch, opts = inputs.batch, self.options
        log_probs, _ = inputs.next_token_probs()  # (B, T-1, V), shared with other probes
        losses = -log_probs.gather(-1, batch.tokens[:, 1:, None])[..., 0]  # (B, T-1): the next-token cross-entropy
        counted = batch.loss_mask.to(losses.dtype)  # (B, T-1)
        names, masks = ["all"], [counted]
        for name in opts["positions"]:
            names.append(name)
            masks.append(batch.predictions(name, "loss").to(losses.dtype))
        for name in opts["complements"]:
            names.append(f"non_{name}")
            masks.append(counted - batch.predictions(name, "loss").to(losses.dtype))
        means = masked_means(losses, torch.stack(masks))  # (S,): every set's mean in one matmul
        measured = [Measurement(name, mean) for name, mean in zip(names, means.unbind())]
        if opts["shuffle"]:
            at, clean = opts["positions"][0], means[1]
            shuffled = masked_mean(token_losses(inputs.rolled_logits(opts["shuffle"], "loss"), batch.tokens),
                                   batch.predictions(at, "loss"))
            measured += [Measurement(f"{opts['shuffle']}_shuffled", shuffled),
                         Measurement(f"{opts['shuffle']}_shuffle_gap", shuffled - clean)]
        if opts["icl_score"]:
            score = icl_score(losses, batch.loss_mask, opts["icl_late"], opts["icl_early"])
            measured += [Measurement("icl_score", score)] if score is not None else []
        return measured


def prediction_accuracy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the predictions in `mask` whose most likely token is the next token: logits (B, T, V),
    tokens (B, T), mask (B, T-1) -> ()."""
    right = (logits[:, :-1].argmax(-1) == tokens[:, 1:]).to(torch.float32)  # (B, T-1)
    return masked_mean(right, mask)
