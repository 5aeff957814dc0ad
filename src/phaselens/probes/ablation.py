"""Mean ablation: replace a head's (or an MLP's) output by its mean and see what the model loses.

A node is `(layer, head)` for an attention head, cut at its mixed values (`hook_z`, so it adds
nothing through W_O but its mean), or `(layer, None)` for a layer's MLP, cut at its output. Every
function asks the model adapter (`phaselens.models.adapter`) for hook names and dimensions, so any
adapter model works. Hooks are registered on the model's `HookPoint`s for the length of one call
and removed by their own handles, so hooks a user added in a notebook stay in place and run too
(TransformerLens' `run_with_hooks` would reset them).

The causal effect of a node on a loss (`ablation_losses`) is the loss on the batch's positions
with the node mean-ablated, its mean taken over the same batch: ΔL = L(ablated) − L(clean). Reports
rank the heads a study names by it (`phaselens.analysis.induction`); the dashboard's ablation view
calls the same hooks (`phaselens.server.interventions`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

from phaselens.models.adapter import ModelAdapter
from phaselens.probes.heads import detection_patterns
from phaselens.probes.loss import masked_mean, token_losses

Hook = Callable[[torch.Tensor], "torch.Tensor | None"]
Node = tuple[int, "int | None"]  # (layer, head) for a head, (layer, None) for the layer's MLP


@contextlib.contextmanager
def temporary_hooks(model: ModelAdapter, hooks: Sequence[tuple[str, Hook]]) -> Iterator[None]:
    """Forward hooks `fn(activation) -> replacement or None` on named hook points, for one block."""
    points = model.hook_points
    handles = []
    try:
        for name, fn in hooks:
            if name not in points:
                raise KeyError(f"the model has no hook point {name!r}")
            handles.append(points[name].register_forward_hook(lambda module, args, out, fn=fn: fn(out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_caching(model: ModelAdapter, tokens: torch.Tensor, names: Sequence[str],
                hooks: Sequence[tuple[str, Hook]] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (B, T, V) and the activations at `names`, with optional intervening hooks."""
    cache: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Hook:
        def keep(x: torch.Tensor) -> None:
            cache[name] = x.detach()
        return keep

    with temporary_hooks(model, [*hooks, *((n, keeper(n)) for n in names)]):
        logits = model.logits(tokens)
    return logits, cache


def copy_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Predictions an induction head can make: tokens (T,) -> (T-1,) bool.

    Position t predicts token t+1; it counts when some earlier occurrence of tokens[t] was
    followed by tokens[t+1] (the induction detection pattern, read at the target).
    """
    induction = detection_patterns(tokens[None])["induction"][0]  # (Q, K): key j follows an earlier copy of tok_q
    follows = tokens[None, :] == tokens[1:, None]  # (T-1, K): token j is the next token of query t
    return (induction[:-1] & follows).any(-1)


def node_hook_name(model: ModelAdapter, layer: int, head: int | None) -> str:
    """Heads are cut at their mixed values (hook_z), so the head adds nothing through W_O; MLPs at their output."""
    return model.z_hook(layer) if head is not None else model.mlp_out_hook(layer)


def per_head(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mixed values as (B, T, H, d_head): TransformerBridge hooks carry them flat, (B, T, H·d_head).

    A view of a contiguous `z` (the hooks below clone it first), so writing into it edits `z`.
    """
    return z if z.dim() == 4 else z.reshape(*z.shape[:2], n_heads, -1)


def node_values(model: ModelAdapter, tokens: torch.Tensor, nodes: Sequence[Node]) -> dict:
    """Each node's activation on `tokens` (B, T): {(layer, head): (B, T, dh) or (B, T, d_model)}."""
    return _cached_node_values(model, tokens, nodes)[1]


def _cached_node_values(model: ModelAdapter, tokens: torch.Tensor, nodes: Sequence[Node]) -> tuple[torch.Tensor, dict]:
    """The logits (B, T, V) of one clean forward pass and each node's activation in it (`node_values`)."""
    names = sorted({node_hook_name(model, layer, head) for layer, head in nodes})
    with torch.no_grad():
        logits, cache = run_caching(model, tokens, names)
    return logits, {(layer, head): per_head(cache[node_hook_name(model, layer, head)], model.n_heads)[:, :, head]
                    if head is not None else cache[node_hook_name(model, layer, head)] for layer, head in nodes}


def mean_values(model: ModelAdapter, tokens: torch.Tensor, nodes: Sequence[Node]) -> dict:
    """Each node's activation averaged over the batch and positions of `tokens` (B, T): {node: (1, 1, ·)}."""
    return _means(node_values(model, tokens, nodes))


def _means(values: dict) -> dict:
    return {node: value.mean((0, 1), keepdim=True) for node, value in values.items()}


def ablation_hooks(model: ModelAdapter, nodes: Sequence[Node], replacements: dict | None) -> list[tuple[str, Hook]]:
    """Hooks that replace each node's activation: by zeros, or by `replacements[node]` (broadcast to (B, T, ·))."""
    hooks = []
    for layer, head in nodes:
        value = None if replacements is None else replacements[(layer, head)]

        def replace(x: torch.Tensor, head=head, value=value) -> torch.Tensor:
            x = x.clone()
            target = per_head(x, model.n_heads)[:, :, head] if head is not None else x  # (B, T, dh) or (B, T, d_model)
            if value is None:
                target.zero_()
            else:
                target.copy_(value[..., : x.shape[1], :].expand_as(target))
            return x

        hooks.append((node_hook_name(model, layer, head), replace))
    return hooks


def ablated_logits(model: ModelAdapter, tokens: torch.Tensor, hooks: Sequence[tuple[str, Hook]]) -> torch.Tensor:
    """Logits (1, T, V) of one sequence (T,) with `hooks` in place."""
    with torch.no_grad(), temporary_hooks(model, hooks):
        return model.logits(tokens[None])


def ablation_losses(model: ModelAdapter, tokens: torch.Tensor, predictions: torch.Tensor,
                    nodes: Sequence[Node]) -> tuple[float, dict]:
    """The mean loss on `predictions`, clean and with each node mean-ablated in turn (one node at a time).

    tokens (B, T), predictions (B, T-1) bool: the positions the loss is read on (a task's prediction
    set, e.g. `copy`). Each node's mean is taken over the same batch and every position. One clean
    forward pass with a cache, then one forward pass per node. Returns (clean loss, {node: ablated loss}).
    """
    logits, values = _cached_node_values(model, tokens, nodes)
    means = _means(values)
    with torch.no_grad():
        clean = float(masked_mean(token_losses(logits, tokens), predictions))
        ablated = {}
        for node in nodes:
            with temporary_hooks(model, ablation_hooks(model, [node], means)):
                ablated[node] = float(masked_mean(token_losses(model.logits(tokens), tokens), predictions))
    return clean, ablated
