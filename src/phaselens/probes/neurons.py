"""Sparse-neuron statistics: firing rates, rare and dead neurons, selectivity, top activations.

A neuron fires on a token when its activation exceeds the threshold (default 0). Everything is
accumulated per neuron in fixed-size tensors (count, sum, max, the top-k values and their
positions), so statistics over any number of tokens take the memory of one chunk. The same
`NeuronStats` serves the `neurons` probe (one probe batch per checkpoint) and the streaming
`phaselens neurons` scan, so both report the same formulas.
"""

from __future__ import annotations

import torch

from phaselens.errors import ConfigError
from phaselens.models.adapter import ModelAdapter, adapter_for
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe

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


def _token_sums(act: torch.Tensor) -> torch.Tensor:
    """Sum over batch and position of (B, T, n) or (B, H, T, N) -> (n,) or (H·N,) (head-major).

    One batched product with a row of ones reads the activation once, at matrix-product speed,
    where a reduction over the position dimension strides through it.
    """
    if act.dim() not in (3, 4):
        raise ValueError(f"neuron activations must be (batch, pos, neurons) or (batch, heads, pos, neurons), got {tuple(act.shape)}")
    T, n = act.shape[-2], act.shape[-1]
    rows = act.reshape(-1, T, n)  # (B·H, T, n): a view
    sums = torch.bmm(act.new_ones(1, 1, T).expand(rows.shape[0], 1, T), rows)  # (B·H, 1, n)
    return sums.view(act.shape[0], -1).sum(0)  # (H·n,)


def _block_maxima(act: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each neuron's maximum over runs of up to 16 consecutive positions, and the run length.

    (B, T, n) -> (B, T/run, n); (B, H, T, N) -> (B, H, T/run, N).

    The k largest of them are k distinct activations of the chunk, so the k-th largest is a floor
    under the chunk's own k-th value, however few sequences the chunk holds (one 2,048-token
    window of a large model, say): only values above it can enter a top-k list.
    """
    T = act.shape[-2]
    run = next(r for r in (16, 8, 4, 2, 1) if T % r == 0)
    if act.dim() == 3:
        B, _, n = act.shape
        return act.reshape(B, T // run, run, n).amax(2), run  # (B, T/run, n)
    B, H, _, N = act.shape
    return act.reshape(B, H, T // run, run, N).amax(3), run  # (B, H, T/run, N)


def _kth_largest_floor(block_max: torch.Tensor, k: int) -> torch.Tensor:
    """A floor under each neuron's k-th largest value: (M, n) maxima of distinct runs -> (n,).

    The k-th largest of maxima over groups of rows is such a floor too (k groups hold k distinct
    values), and a top-k over a few dozen rows costs a fraction of one over hundreds; groups are
    kept few enough that at least 3k of them remain, so the floor stays close.
    """
    M = block_max.shape[0]
    group = next((g for g in (8, 4, 2) if M % g == 0 and M // g >= 3 * k), 1)
    if group > 1:
        block_max = block_max.view(M // group, group, -1).amax(1)  # (M/group, n)
    return block_max.topk(k, dim=0).values[-1]


def default_neuron_hook(model: torch.nn.Module | ModelAdapter) -> str:
    """The per-layer hook template whose units count as neurons: BDH's xy_sparse, else the MLP output."""
    names = adapter_for(model).hook_points
    for template in NEURON_HOOKS:
        if template.format(0) in names:
            return template
    raise ConfigError("the model has no neurons to measure: neither blocks.{l}.hook_xy_sparse (BDH) nor blocks.{l}.mlp.hook_post "
                      "(a transformer with MLPs; an attention-only model has none); name another hook with --hook")


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
        # Top-k of the firing values only: empty slots hold the threshold, at position -1.
        self.top_values = torch.full((top_k, n_neurons), float(threshold), device=device)  # (k, n), descending
        self.top_positions = torch.full((top_k, n_neurons), -1, dtype=torch.long, device=device)  # (k, n)
        self._fired: torch.Tensor | None = None  # reused 0/1 buffer of the chunk's shape

    @torch.no_grad()
    def update(self, act: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add a chunk of activations: (B, T, n), per head (B, H, T, N) (neurons head-major), or token rows (M, n).

        `positions` (B·T,) are the stream positions of its tokens in (batch, pos) order (default: the next B·T).
        Reductions run on the activation's own layout, so no copy of the chunk is made.
        """
        act = act.float()
        if act.dim() == 2:
            act = act[None]  # token rows: one "sequence"
        tokens = act.shape[0] * act.shape[-2]
        if positions is None:
            positions = torch.arange(self.tokens, self.tokens + tokens, device=act.device)
        self.tokens += tokens
        if self._fired is None or self._fired.shape != act.shape:
            self._fired = torch.empty_like(act)
        fired = torch.gt(act, self.threshold, out=self._fired)  # 0/1 floats: exact sums up to 2^24 tokens a chunk
        self.count += _token_sums(fired).long()
        self.total += _token_sums(act).double()
        blocks, run = _block_maxima(act)  # (B, T/run, n) or (B, H, T/run, N): maxima of short runs of positions
        block_max = blocks.reshape(-1, blocks.shape[-1]) if act.dim() == 3 else \
            blocks.transpose(1, 2).reshape(-1, blocks.shape[1] * blocks.shape[-1])  # (M, n), neurons head-major
        chunk_max = block_max.amax(0)  # (n,)
        torch.maximum(self.max, chunk_max, out=self.max)
        if self.top_k and bool((chunk_max > self.top_values[-1]).any()):
            self._merge_top(act, positions, blocks, block_max, run)

    def _merge_top(self, act: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor, block_max: torch.Tensor,
                   run: int) -> None:
        """Merge the chunk's values that can enter a neuron's top-k into it.

        A value can enter only if it reaches the neuron's current k-th value, and the chunk's own
        k-th value, which is at least the k-th largest of its block maxima (k distinct elements).
        Only the runs of positions whose maximum reaches that floor are read again, value by value:
        one comparison over the block maxima (1/run of the chunk), a gather of the few candidate
        runs and a small sort, and never a copy of the chunk in another layout.
        """
        n, k = self.count.numel(), self.top_k
        firing = torch.nextafter(torch.tensor(float(self.threshold)), torch.tensor(float("inf"))).item()
        floor = self.top_values[-1].clamp(min=firing)  # (n,)
        if block_max.shape[0] >= k:
            floor = torch.maximum(floor, _kth_largest_floor(block_max, k))
        steps = torch.arange(run, device=act.device)
        if act.dim() == 4:
            B, H, T, N = act.shape
            runs = (blocks >= floor.view(H, 1, N)).nonzero()  # (C, 4): b, h, block, j
            t = runs[:, 2:3] * run + steps  # (C, run)
            candidates = act[runs[:, 0:1], runs[:, 1:2], t, runs[:, 3:4]]  # (C, run)
            run_neuron = runs[:, 1] * N + runs[:, 3]  # (C,)
        else:
            B, T, _ = act.shape
            runs = (blocks >= floor).nonzero()  # (C, 3): b, block, j
            t = runs[:, 1:2] * run + steps  # (C, run)
            candidates = act[runs[:, 0:1], t, runs[:, 2:3]]  # (C, run)
            run_neuron = runs[:, 2]  # (C,)
        which, offset = (candidates >= floor[run_neuron][:, None]).nonzero(as_tuple=True)  # (E,) each
        values = candidates[which, offset]  # (E,)
        neuron = run_neuron[which]  # (E,)
        where = positions[runs[which, 0] * T + t[which, offset]]  # (E,)
        if not len(values):
            return
        # One row per touched neuron: its k kept entries, then its new hits in stream order; a stable
        # sort of each row keeps the k largest, the earlier of equal values first.
        by_neuron = neuron.argsort(stable=True)  # (E,): hits grouped by neuron, stream order within
        neuron, values, where = neuron[by_neuron], values[by_neuron], where[by_neuron]
        hits = torch.bincount(neuron, minlength=n)  # (n,)
        touched = hits.nonzero().squeeze(1)  # (c,)
        row = (hits > 0).cumsum(0)[neuron] - 1  # (E,): the touched row of each hit
        column = k + torch.arange(len(neuron), device=act.device) - (hits.cumsum(0) - hits)[neuron]  # (E,)
        pool = torch.full((len(touched), k + int(hits.max())), float("-inf"), device=act.device)  # (c, k + most hits)
        pool_where = torch.full(pool.shape, -1, dtype=torch.long, device=act.device)
        pool[:, :k] = self.top_values[:, touched].T
        pool_where[:, :k] = self.top_positions[:, touched].T
        pool[row, column] = values
        pool_where[row, column] = where
        best, order = pool.sort(dim=1, descending=True, stable=True)  # (c, k + most hits)
        self.top_values[:, touched] = best[:, :k].T
        self.top_positions[:, touched] = pool_where.gather(1, order[:, :k]).T

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
            "frac_dead": dead_fraction(self.count),
            "selectivity_median": firing.median() if len(firing) else torch.tensor(float("nan"), dtype=torch.float64),
        }

    def rate_quantiles(self) -> dict[float, float]:
        q = torch.tensor(RATE_QUANTILES, dtype=torch.float64, device=self.count.device)
        return dict(zip(RATE_QUANTILES, self.firing_rate().quantile(q).tolist()))


SUMMARY_METRICS = ("firing_rate_mean", "frac_rare", "frac_dead", "selectivity_median")


def dead_fraction(count: torch.Tensor) -> torch.Tensor:
    """Share of neurons that fired on no token of the sample: count (n,) long (tokens each fired on) -> () float64.

    The one definition of a dead neuron, used by the `neurons` probe, `phaselens neurons` and every report
    section that prints the share. It is read on a sample, so it falls as the sample grows (a neuron silent on
    a probe batch of a few thousand tokens may fire in a 200,000-token scan): reports name the sample, and the
    run report quotes the scan's value at the step a scan measured (`report.neurons`).
    """
    return (count == 0).double().mean()


@register_probe
class NeuronsProbe(Probe):
    """Per layer: mean firing rate, share of rare (<1% of tokens) and dead neurons, median selectivity.

    Options: `hook` (a per-layer template such as "blocks.{}.hook_x_sparse"; default BDH's
    xy_sparse or a transformer's mlp.hook_post) and `threshold` (default 0).
    """

    name = "neurons"
    needs = Needs(parts=frozenset({"mlp_neurons"}))
    option_names = ("hook", "threshold")
    off_thread = True  # reads activations and the batch only

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        template = self.options.get("hook") or default_neuron_hook(adapter)
        return [template.format(layer) for layer in range(adapter.n_layers)]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        summaries = []
        for name in self.hook_names(inputs.adapter):
            act = inputs.acts[name]  # (B, T, n) or (B, H, T, N)
            n = act.shape[-1] * (act.shape[1] if act.dim() == 4 else 1)
            stats = NeuronStats(n, top_k=0, threshold=self.options.get("threshold", 0.0), device=act.device)
            stats.update(act)
            summaries.append(stats.summary())
        return [Measurement(metric, torch.stack([s[metric] for s in summaries]).float()) for metric in SUMMARY_METRICS]
