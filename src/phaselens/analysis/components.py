"""Components named by what they do: a study's headline loss with each head (or MLP) mean-ablated, at chosen checkpoints.

The reports rank the components they name by this causal effect (`probes.ablation.ablation_losses`):
the induction report its induction and previous-token heads by the copy-position loss, the grokking
report every head and MLP by the held-out answer loss. It loads each checkpoint once and runs one
clean forward pass and one per component on the run's stored batch, so it is cheap for the small
models these studies train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from phaselens.errors import PhaselensError

if TYPE_CHECKING:  # the ablation itself (torch) is imported where it runs
    from phaselens.probes.ablation import Node


@dataclass(frozen=True)
class Ablations:
    """The headline loss at one checkpoint, clean and with each node mean-ablated in turn."""

    step: int
    clean: float
    ablated: dict  # node -> loss with that node mean-ablated


def node_label(node: Node) -> str:
    layer, head = node
    return f"L{layer}H{head}" if head is not None else f"MLP {layer}"


def ablation_steps(checkpoints: list[int], after: int | None) -> list[int]:
    """Where components are ablated: the final checkpoint, then the first at or after step `after` (the end of the
    study's first headline change, where its components have just formed) when that is another one."""
    if not checkpoints:
        return []
    steps = [checkpoints[-1]]
    later = [s for s in checkpoints if after is not None and s >= after]
    if later and later[0] != steps[0]:
        steps.append(later[0])
    return steps


def ablations_at(run, steps: list[int], nodes: list[Node] | None, positions: str,
                 leave_out: str | None = None) -> tuple[list[Ablations], str | None]:
    """Mean-ablate each node (None: every head and every MLP, as the model adapter lists them) at each checkpoint in
    `steps`, reading the loss on the prediction set `positions` (less the set `leave_out`, e.g. the training pairs) of
    the first stored batch that has it (probe, then induction batch). Returns the measurements, or none and the reason
    they could not be taken."""
    from phaselens.models.adapter import adapter_for
    from phaselens.probes.ablation import ablation_losses

    if not steps:
        return [], "the run has no checkpoints"
    try:
        batches = run.probe_batches()
        batch = next((b for b in (batches.get("probe"), batches.get("induction"))
                      if b is not None and positions in b.positions and (leave_out is None or leave_out in b.positions)), None)
        if batch is None:
            return [], f"no stored batch has the {positions!r} positions"
        mask = batch.predictions(positions)  # (B, T-1)
        if leave_out is not None:
            mask = mask & ~batch.predictions(leave_out)
        if not bool(mask.any()):
            return [], f"the batch has no {positions!r} positions to read the loss on"
        found = []
        for step in steps:
            model = adapter_for(run.load_model(step))
            if nodes is None:
                nodes = [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]
                nodes += [(layer, None) for layer in model.mlp_layers]
            clean, ablated = ablation_losses(model, batch.tokens.to(model.device), mask.to(model.device), nodes)
            found.append(Ablations(step, clean, ablated))
    except (PhaselensError, OSError, KeyError) as error:
        return [], (str(error).splitlines()[0] if str(error) else type(error).__name__)
    return found, None
