"""Sparse-neuron statistics: firing rates, rare and dead neurons, selectivity, top activations.

A neuron fires on a token when its activation exceeds the threshold (default 0). Everything is
accumulated per neuron in fixed-size tensors (count, sum, max, the top-k values and their
positions), so statistics over any number of tokens take the memory of one chunk. The same
`NeuronStats` serves the `neurons` probe (one probe batch per checkpoint) and the streaming
`phaselens neurons` scan, so both report the same formulas.
"""

from __future__ import annotations

import torch

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe

RARE_RATE = 0.01  # a neuron is rare when it fires on fewer than 1% of tokens
RATE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
NEURON_HOOKS = ("blocks.{}.hook_xy_sparse", "blocks.{}.mlp.hook_post")  # BDH's product code; a transformer's MLP


def token_neurons(act: torch.Tensor) -> torch.Tensor:
    """An activation as one row per token: (B, T, n) -> (B·T, n); per-head (B, H, T, N) -> (B·T, H·N), head-major."""
    if act.dim() == 3:
        return act.reshape(-1, act.shape[-1])
    if act.dim() == 4:
        B, H, T, N = act.shape
        return act.transpose(1, 2).reshape(B * T, H * N)
    raise ValueError(f"neuron activations must be (batch, pos, neurons) or (batch, heads, pos, neurons), got {tuple(act.shape)}")


def default_neuron_hook(model: torch.nn.Module) -> str:
    """The per-layer hook template whose units count as neurons: BDH's xy_sparse, else the MLP output."""
    names = model.hook_dict
    for template in NEURON_HOOKS:
        if template.format(0) in names:
            return template
    raise ValueError("the model has neither blocks.{l}.hook_xy_sparse (BDH) nor blocks.{l}.mlp.hook_post (a transformer "
                     "with MLPs); name the hook to measure with --hook")


class NeuronStats:
    """Running per-neuron statistics over token rows; memory is O(n_neurons · top_k), whatever the token count.

    Args:
        n_neurons: units per token row.
        top_k: how many strongest activations (with their positions) to keep per neuron; 0 keeps none.
        threshold: a neuron fires when its value exceeds this.
    """

    def __init__(self, n_neurons: int, top_k: int = 10, threshold: float = 0.0, device: torch.device | str = "cpu"):
        self.top_k, self.threshold = top_k, threshold
        self.tokens = 0
        self.count = torch.zeros(n_neurons, dtype=torch.long, device=device)  # tokens it fired on
        self.total = torch.zeros(n_neurons, dtype=torch.float64, device=device)  # sum of activations
        self.max = torch.full((n_neurons,), float("-inf"), device=device)
        self.top_values = torch.full((top_k, n_neurons), float("-inf"), device=device)  # (k, n), descending
        self.top_positions = torch.full((top_k, n_neurons), -1, dtype=torch.long, device=device)  # (k, n)

    @torch.no_grad()
    def update(self, acts: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add token rows `acts` (M, n) whose stream positions are `positions` (M,) (default: the next M)."""
        acts = acts.float()
        M = acts.shape[0]
        if positions is None:
            positions = torch.arange(self.tokens, self.tokens + M, device=acts.device)
        self.tokens += M
        self.count += (acts > self.threshold).sum(0)
        self.total += acts.sum(0, dtype=torch.float64)
        chunk_max = acts.amax(0)  # (n,)
        torch.maximum(self.max, chunk_max, out=self.max)
        if self.top_k:
            self._merge_top(acts, positions, chunk_max)

    def _merge_top(self, acts: torch.Tensor, positions: torch.Tensor, chunk_max: torch.Tensor) -> None:
        # Only neurons whose chunk maximum beats their current k-th value can change their top-k:
        # once the stream is warm that is a small share, which keeps topk off most columns.
        candidates = (chunk_max > self.top_values[-1]).nonzero().squeeze(1)  # (c,)
        if not len(candidates):
            return
        k = min(self.top_k, acts.shape[0])
        values, rows = acts.index_select(1, candidates).topk(k, dim=0)  # (k, c)
        merged = torch.cat((self.top_values[:, candidates], values))  # (k_old + k, c)
        where = torch.cat((self.top_positions[:, candidates], positions[rows]))
        best, pick = merged.topk(self.top_k, dim=0)  # (top_k, c)
        self.top_values[:, candidates] = best
        self.top_positions[:, candidates] = where.gather(0, pick)

    def firing_rate(self) -> torch.Tensor:
        """Share of tokens each neuron fired on: (n,)."""
        return self.count.double() / max(self.tokens, 1)

    def mean(self) -> torch.Tensor:
        """Mean activation over all tokens: (n,)."""
        return self.total / max(self.tokens, 1)

    def selectivity(self) -> torch.Tensor:
        """max / mean over tokens for neurons that fired; NaN for those that never did: (n,)."""
        fired = self.count > 0
        ratio = self.max.double() / self.mean()
        return torch.where(fired, ratio, torch.full_like(ratio, float("nan")))

    def summary(self) -> dict[str, torch.Tensor]:
        """The layer summary the `neurons` probe logs: firing_rate_mean, frac_rare, frac_dead, selectivity_median."""
        rate = self.firing_rate()
        selectivity = self.selectivity()
        firing = selectivity[~selectivity.isnan()]
        return {
            "firing_rate_mean": rate.mean(),
            "frac_rare": (rate < RARE_RATE).double().mean(),
            "frac_dead": (self.count == 0).double().mean(),
            "selectivity_median": firing.median() if len(firing) else torch.tensor(float("nan"), dtype=torch.float64),
        }

    def rate_quantiles(self) -> dict[float, float]:
        q = torch.tensor(RATE_QUANTILES, dtype=torch.float64, device=self.count.device)
        return dict(zip(RATE_QUANTILES, self.firing_rate().quantile(q).tolist()))


SUMMARY_METRICS = ("firing_rate_mean", "frac_rare", "frac_dead", "selectivity_median")


@register_probe
class NeuronsProbe(Probe):
    """Per layer: mean firing rate, share of rare (<1% of tokens) and dead neurons, median selectivity.

    Options: `hook` (a per-layer template such as "blocks.{}.hook_x_sparse"; default BDH's
    xy_sparse or a transformer's mlp.hook_post) and `threshold` (default 0).
    """

    name = "neurons"

    def bind(self, model: torch.nn.Module) -> None:
        self.template = self.options.get("hook") or default_neuron_hook(model)

    def hook_names(self, n_layers: int) -> list[str]:
        template = getattr(self, "template", None) or self.options.get("hook") or NEURON_HOOKS[0]
        return [template.format(layer) for layer in range(n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        summaries = []
        for name in self.hook_names(inputs.n_layers):
            acts = token_neurons(inputs.acts[name])  # (B·T, n)
            stats = NeuronStats(acts.shape[1], top_k=0, threshold=self.options.get("threshold", 0.0), device=acts.device)
            stats.update(acts)
            summaries.append(stats.summary())
        return [Measurement(metric, torch.stack([s[metric] for s in summaries]).float()) for metric in SUMMARY_METRICS]
