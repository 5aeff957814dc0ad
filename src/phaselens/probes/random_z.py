"""Random-z evaluation: how much a prediction changes when the selector is swapped for another row's.

Each row's selector set (option `selector`, the task's `z`) is replaced by the next row's (the same
derangement as the loss probe's shuffled loss, and the same forward: `ProbeInputs.rolled_logits`); rows
whose selector happens to be the same are left out. At the prediction set `read` (one prediction per row,
the task's `first_target`): `p_drop` = mean of p(target | own z) − p(target | other z), `argmax_change` =
the share of rows whose predicted token changes. Both are ≈ 0 while the model ignores z and rise as it
learns to use it.
"""

from __future__ import annotations

import torch

from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe


def selector_swap_effect(logits: torch.Tensor, swapped_logits: torch.Tensor, tokens: torch.Tensor, swapped: torch.Tensor,
                         read: torch.Tensor) -> torch.Tensor:
    """(p_drop, argmax_change) as a (2,) tensor; NaN when no row's selector differs from the next row's.

    logits, swapped_logits (B, T, V) of `tokens` and of `swapped` (B, T); read (B, T-1) with one prediction per row.
    """
    differs = (swapped != tokens).any(-1)  # (B,)
    position = read.int().argmax(-1)  # (B,) the prediction read
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    target = tokens[rows, position + 1]  # (B,)
    clean = logits[rows, position].float()  # (B, V)
    other = swapped_logits[rows, position].float()  # (B, V)
    p_clean = clean.softmax(-1)[rows, target]
    p_other = other.softmax(-1)[rows, target]
    changed = (clean.argmax(-1) != other.argmax(-1)).float()
    weights = differs.float() / differs.float().sum()  # NaN weights (0/0) when nothing differs
    return torch.stack(((p_clean - p_other) @ weights, changed @ weights))


@register_probe
class RandomZProbe(Probe):
    """`p_drop` and `argmax_change` of the prediction at `read` when token set `selector` is swapped for another row's."""

    name = "random_z"
    needs = Needs(position_options=("selector", "read"), live=False)
    needs_logits = True

    def __init__(self, selector: str | None = None, read: str | None = None):
        super().__init__(selector=selector, read=read)

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        batch, opts = inputs.batch, self.options
        if not (opts["selector"] and opts["read"]):
            raise ValueError("random_z needs options selector (a token set, e.g. z) and read (a prediction set, "
                             "e.g. first_target); this task declares none")
        swapped_logits = inputs.rolled_logits(opts["selector"], "random_z")
        values = selector_swap_effect(inputs.logits, swapped_logits, batch.tokens, batch.rolled(opts["selector"], "random_z"),
                                      batch.predictions(opts["read"], "random_z"))
        return [Measurement("p_drop", values[0]), Measurement("argmax_change", values[1])]
