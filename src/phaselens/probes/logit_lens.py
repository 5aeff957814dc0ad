"""Logit lens: read the residual stream after each layer through the final norm and unembedding.

Layer 0 is the embeddings (`blocks.0.hook_resid_pre`), layer ℓ the stream after block ℓ−1
(`blocks.{ℓ−1}.hook_resid_post`); the last layer is the model's own prediction.
"""

from __future__ import annotations

import torch

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe
from phaselens.tasks.batch import TaskBatch

POSITIONS = ("loss", "copy", "first_target")


def lens_positions(batch: TaskBatch, positions: str, first_token_only: bool) -> torch.Tensor:
    """Which next-token predictions to read: (B, T-1) bool."""
    if positions == "copy":
        if batch.copy_mask is None:
            raise ValueError("logit_lens positions='copy' needs a task with a copy mask")
        mask = batch.copy_mask & batch.loss_mask
    elif positions == "first_target":
        if batch.first_target_mask is None:
            raise ValueError("logit_lens positions='first_target' needs a task with a first-target mask")
        mask = batch.first_target_mask & batch.loss_mask
    else:
        mask = batch.loss_mask
    if first_token_only:  # the first position of each sequence's mask: e.g. the first target token
        first = mask.int().argmax(-1)  # (B,)
        only = torch.zeros_like(mask)
        only[torch.arange(mask.shape[0], device=mask.device), first] = True
        mask = only & mask
    return mask


def logit_lens_stats(resid: torch.Tensor, model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """p_correct, top1 and entropy per layer, over masked positions.

    resid (L+1, B, T, d_model) streams, tokens (B, T), mask (B, T-1) -> each (L+1,).
    """
    logits = model.unembed(model.ln_final(resid[:, :, :-1]))  # (L+1, B, T-1, V)
    logp = logits.float().log_softmax(-1)
    target = tokens[:, 1:].expand(resid.shape[0], -1, -1)  # (L+1, B, T-1)
    p_correct = logp.gather(-1, target[..., None])[..., 0].exp()  # (L+1, B, T-1)
    top1 = (logp.argmax(-1) == target).float()
    entropy = -(logp.exp() * logp).sum(-1)
    weights = mask.float() / mask.float().sum()  # (B, T-1)
    return {name: (value * weights).sum(dim=(-2, -1)) for name, value in
            (("p_correct", p_correct), ("top1", top1), ("entropy", entropy))}


@register_probe
class LogitLensProbe(Probe):
    """`p_correct`, `top1`, `entropy` per layer. Options: positions='loss'|'copy'|'first_target', first_token_only.

    On a batch with a first-target mask (late disambiguation) the default reads only the first target
    token, the one that needs z; pass positions='loss' explicitly for every target position.
    """

    name = "logit_lens"
    live = False  # an unembedding per layer: measure it on checkpoints

    def __init__(self, positions: str | None = None, first_token_only: bool = False):
        if positions is not None and positions not in POSITIONS:
            raise ValueError(f"logit_lens positions must be one of {POSITIONS}, got {positions!r}")
        super().__init__(positions=positions, first_token_only=first_token_only)

    def hook_names(self, n_layers: int) -> list[str]:
        return ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        names = self.hook_names(inputs.n_layers)
        resid = torch.stack([inputs.acts[name] for name in names])  # (L+1, B, T, d_model)
        positions = self.options["positions"] or ("first_target" if inputs.batch.first_target_mask is not None else "loss")
        mask = lens_positions(inputs.batch, positions, self.options["first_token_only"])
        stats = logit_lens_stats(resid, inputs.model, inputs.batch.tokens, mask)
        return [Measurement(name, value) for name, value in stats.items()]
