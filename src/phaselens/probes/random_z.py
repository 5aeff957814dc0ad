"""Random-z evaluation: how much the first-target prediction changes when the selector is swapped.

Each row's z is replaced by the next row's (the same derangement as the `z_shuffled` loss); rows whose
z happens to be the same are left out. `p_drop` = mean of p(first target | own z) − p(first target | other z),
`argmax_change` = the share of rows whose predicted first token changes. Both are ≈ 0 while the model
ignores z and rise as it learns to use it.
"""

from __future__ import annotations

import torch

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe
from phaselens.tasks.disambiguation import roll_selectors


def selector_swap_effect(model: torch.nn.Module, logits: torch.Tensor, tokens: torch.Tensor, selector_mask: torch.Tensor,
                         first_target_mask: torch.Tensor) -> torch.Tensor:
    """(p_drop, argmax_change) as a (2,) tensor; NaN when no row's z differs from the next row's.

    logits (B, T, V) of `tokens` (B, T); selector_mask (B, T); first_target_mask (B, T-1) with one position per row.
    """
    swapped = roll_selectors(tokens, selector_mask)  # (B, T)
    differs = (swapped != tokens).any(-1)  # (B,)
    position = first_target_mask.int().argmax(-1)  # (B,) the prediction of the first target token
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    target = tokens[rows, position + 1]  # (B,)
    clean = logits[rows, position].float()  # (B, V)
    other = model(swapped)[rows, position].float()  # (B, V)
    p_clean = clean.softmax(-1)[rows, target]
    p_other = other.softmax(-1)[rows, target]
    changed = (clean.argmax(-1) != other.argmax(-1)).float()
    weights = differs.float() / differs.float().sum()  # NaN weights (0/0) when nothing differs
    return torch.stack(((p_clean - p_other) @ weights, changed @ weights))


@register_probe
class RandomZProbe(Probe):
    """`p_drop` and `argmax_change` of the first-target prediction when z is swapped for another."""

    name = "random_z"
    live = False
    needs_logits = True

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        batch = inputs.batch
        if batch.selector_mask is None or batch.first_target_mask is None:
            return []  # no selector in this task
        values = selector_swap_effect(inputs.model, inputs.logits, batch.tokens, batch.selector_mask, batch.first_target_mask)
        return [Measurement("p_drop", values[0]), Measurement("argmax_change", values[1])]
