"""Logit lens: read the residual stream after each layer through the final norm and unembedding.

Layer ℓ is residual stream ℓ (`models.sites`): 0 the embeddings, ℓ the stream after block ℓ−1;
the last layer is the model's own prediction. The final norm and unembedding are the model
adapter's, so the lens reads any architecture the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from phaselens.models.adapter import ModelAdapter, adapter_for
from phaselens.models.sites import residual_sites
from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe
from phaselens.tasks.batch import TaskBatch

def lens_positions(batch: TaskBatch, positions: str, first_token_only: bool) -> torch.Tensor:
    """Which next-token predictions to read: prediction set `positions` ("loss": every counted one), (B, T-1) bool."""
    mask = batch.predictions(positions, "logit_lens")
    if first_token_only:  # the first position of each sequence's mask: e.g. the first target token
        first = mask.int().argmax(-1)  # (B,)
        only = torch.zeros_like(mask)
        only[torch.arange(mask.shape[0], device=mask.device), first] = True
        mask = only & mask
    return mask


def logit_lens_stats(
    resid: torch.Tensor | Sequence[torch.Tensor],
    model: torch.nn.Module | ModelAdapter,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    final_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """p_correct, top1 and entropy per layer, averaged over the masked predictions.

    resid: L+1 streams (B, T, d_model), stacked or as a list; tokens (B, T); mask (B, T-1)
    -> each (L+1,). Only masked predictions are unembedded. `final_logits` (B, T, V), the model's
    own output, stands in for the last stream's lens (it is the model's prediction): one
    unembedding fewer.
    """
    every = bool(mask.all())  # the common case (every prediction): no gather at all

    def pick(x: torch.Tensor) -> torch.Tensor:  # (B, T-1, ...) -> (N, ...) at the masked predictions
        return x.flatten(0, 1) if every else x[mask]

    adapter = adapter_for(model)
    streams = list(resid)
    dtype = adapter.dtype  # streams may have been widened to float32 from the model's dtype
    lenses = [adapter.logits_from(pick(stream[:, :-1]).to(dtype)) for stream in (streams if final_logits is None else streams[:-1])]
    if final_logits is not None:
        lenses.append(pick(final_logits[:, :-1]))
    target = pick(tokens[:, 1:, None])  # (N, 1): the token each prediction should name
    stats = []
    for logits in lenses:  # (N, V) each
        logp = logits.float().log_softmax(-1)
        correct = logp.gather(-1, target)  # (N, 1)
        stats.append(torch.stack([
            correct.exp().mean(),
            (correct >= logp.amax(-1, keepdim=True)).float().mean(),  # the target is the most likely token
            # mean entropy in nats: one dot product over every (prediction, token), no (N,) temporary
            -torch.dot(logp.exp().view(-1), logp.view(-1)) / logp.shape[0],
        ]))
    values = torch.stack(stats, 1)  # (3, L+1)
    return {"p_correct": values[0], "top1": values[1], "entropy": values[2]}


@register_probe
class LogitLensProbe(Probe):
    """`p_correct`, `top1`, `entropy` per layer.

    Options: `positions`, the prediction set read ("loss": every counted prediction; a task may declare
    its own, e.g. late disambiguation reads `first_target`, the token that needs z), and
    `first_token_only` (only the first prediction of the set in each sequence).
    """

    name = "logit_lens"
    live = False  # an unembedding per layer: measure it on checkpoints

    def __init__(self, positions: str = "loss", first_token_only: bool = False):
        super().__init__(positions=positions, first_token_only=first_token_only)

    def hook_names(self, n_layers: int) -> list[str]:
        return [site.hook for site in residual_sites(n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        names = self.hook_names(inputs.n_layers)
        resid = [inputs.acts[name] for name in names]  # L+1 streams (B, T, d_model)
        mask = lens_positions(inputs.batch, self.options["positions"], self.options["first_token_only"])
        stats = logit_lens_stats(resid, inputs.adapter, inputs.batch.tokens, mask, final_logits=inputs.logits)
        return [Measurement(name, value) for name, value in stats.items()]
