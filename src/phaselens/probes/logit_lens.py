"""Logit lens: read the residual stream after each layer through the final norm and unembedding.

Layer ℓ is residual stream ℓ (`models.sites`): 0 the embeddings, ℓ the stream after block ℓ−1;
the last layer is the model's own prediction. The final norm and unembedding are the model
adapter's, so the lens reads any architecture the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from phaselens.models.adapter import ModelAdapter, adapter_for
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
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


def rows_by_token(rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(distinct rows (U, d), inverse (N,)) when rows (N, d) are a function of ids (N,) and some id repeats; else None.

    Checked exactly: every row must equal the first row of its id.
    """
    distinct, inverse = torch.unique(ids, return_inverse=True)  # (U,), (N,)
    if len(distinct) == len(ids):
        return None
    first = torch.full(distinct.shape, len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), "amin")  # (U,) first row of each id
    representative = rows[first]  # (U, d)
    return (representative, inverse) if torch.equal(representative[inverse], rows) else None


def lens_stats(logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None, own: bool = False) -> torch.Tensor:
    """[mean p(target), share of predictions whose top token is the target, mean entropy (nats)]: (3,).

    logits (U, V), one row per prediction, or per distinct row with `rows` (N,) saying which row
    each of the N predictions (targets (N,)) reads. `own`: the logits are a temporary to overwrite.
    One exp over (U, V): with s = logits − max, log p = s − log Σe^s and H = log Σe^s − Σ e^s·s / Σe^s.
    """
    z = logits.float()
    top = z.amax(-1, keepdim=True)  # (U, 1)
    shifted = z.sub_(top) if own or z is not logits else z - top  # (U, V), 0 at each row's most likely token
    e = shifted.exp()  # (U, V)
    total = e.sum(-1)  # (U,)
    log_total = total.log()
    entropy = log_total - torch.linalg.vecdot(e, shifted) / total  # (U,)
    if rows is None:
        rows = torch.arange(len(target), device=target.device)
    correct = shifted[rows, target]  # (N,): the target's shifted logit
    return torch.stack([
        (correct - log_total[rows]).exp().mean(),
        (correct >= 0).float().mean(),  # the target is the most likely token
        entropy[rows].mean(),
    ])


def logit_lens_stats(
    resid: torch.Tensor | Sequence[torch.Tensor],
    model: torch.nn.Module | ModelAdapter,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    final_logits: torch.Tensor | None = None,
    final_predictions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """p_correct, top1 and entropy per layer, averaged over the masked predictions.

    resid: L+1 streams (B, T, d_model), stacked or as a list; tokens (B, T); mask (B, T-1)
    -> each (L+1,). Only masked predictions are unembedded. `final_logits` (B, T, V), the model's
    own output, stands in for the last stream's lens (it is the model's prediction): one
    unembedding fewer. `final_predictions` ((B, T-1, V) log p and p of those logits, already
    computed for other probes: `ProbeInputs.next_token_probs`) spares the last layer its softmax.
    """
    every = bool(mask.all())  # the common case (every prediction): no gather at all

    def pick(x: torch.Tensor) -> torch.Tensor:  # (B, T-1, ...) -> (N, ...) at the masked predictions
        return x.flatten(0, 1) if every else x[mask]

    adapter = adapter_for(model)
    streams = list(resid)
    dtype = adapter.dtype  # streams may have been widened to float32 from the model's dtype
    target = pick(tokens[:, 1:])  # (N,): the token each prediction should name
    stats = []
    for layer, stream in enumerate(streams):
        if final_predictions is not None and layer == len(streams) - 1:
            logp, p = (pick(x) for x in final_predictions)  # (N, V) each
            correct = logp.gather(-1, target[:, None])[:, 0]  # (N,)
            stats.append(torch.stack([correct.exp().mean(), (correct >= logp.amax(-1)).float().mean(),
                                      -torch.linalg.vecdot(p, logp).mean()]))
            continue
        if final_logits is not None and layer == len(streams) - 1:
            stats.append(lens_stats(pick(final_logits[:, :-1]), target))
            continue
        rows = pick(stream[:, :-1]).to(dtype)  # (N, d_model)
        # The embeddings of a model without positional embeddings depend on the token alone (rotary
        # models such as Pythia): unembed each distinct token once, where every row is its token's row.
        by_token = rows_by_token(rows, pick(tokens[:, :-1])) if layer == 0 else None
        if by_token is not None:
            distinct, inverse = by_token
            stats.append(lens_stats(adapter.logits_from(distinct), target, inverse, own=True))
        else:
            stats.append(lens_stats(adapter.logits_from(rows), target, own=True))
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
    # an unembedding per layer: measured on checkpoints only
    needs = Needs(parts=frozenset({"final_norm"}), position_options=("positions",), live=False)
    uses_logits = True  # the model's own logits spare it an unembedding (lens) or a clean forward (patching)

    def __init__(self, positions: str = "loss", first_token_only: bool = False):
        super().__init__(positions=positions, first_token_only=first_token_only)

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        return [site.hook for site in adapter.residual_sites]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        names = self.hook_names(inputs.adapter)
        resid = [inputs.acts[name] for name in names]  # L+1 streams (B, T, d_model)
        mask = lens_positions(inputs.batch, self.options["positions"], self.options["first_token_only"])
        shared = inputs.next_token_probs() if inputs.logits is not None else None
        stats = logit_lens_stats(resid, inputs.adapter, inputs.batch.tokens, mask, final_logits=inputs.logits,
                                 final_predictions=shared)
        return [Measurement(name, value) for name, value in stats.items()]
