"""Activation patching of the residual stream between paired inputs, layer by layer.

A pair is a corrupted input (example 1) and a clean one (example 2) that differ at a few
positions. For each layer ℓ we run the corrupted input with its residual stream at those
positions replaced by the clean one's and measure

    e_ℓ = p_patched(target₂) − p_corrupted(target₂)

at the positions that predict the clean target. `z_dependence` = mean over pairs of max_ℓ e_ℓ:
how much the prediction depends on the information at the patched positions, wherever it is.
Layer ℓ patches residual stream ℓ (`models.sites`): 0 the embeddings, ℓ the stream after block ℓ−1.

The probe reads the task's position sets by name (options, declared by the task): `patch`, the
token set patched; `read`, the prediction set read; `corrupt`, where the corrupted input comes
from. `corrupt="noise"`: the batch itself is clean and the corrupted input has random tokens at
the patched set (induction: the segment's first occurrence, read at the copies).
`corrupt="partner"`: the batch pairs its rows (`pair_index`); row one is corrupted, its partner
clean (late disambiguation: same B, other z and first target; z patched, first target read).
"""

from __future__ import annotations

from typing import Sequence

import torch

from phaselens.models.adapter import FAST_PATHS, ModelAdapter, adapter_for
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe


def corrupt_positions(tokens: torch.Tensor, positions: torch.Tensor, vocab: int | Sequence[int], seed: int) -> torch.Tensor:
    """Tokens (B, T) with every position in `positions` (B, T) replaced by a random token (fixed seed): (B, T).

    `vocab`: the vocabulary size, or the ids to draw from (a tokenizer's ordinary ids: no special tokens).
    """
    ids = torch.arange(vocab) if isinstance(vocab, int) else torch.as_tensor(list(vocab), dtype=torch.long)  # (n,)
    rng = torch.Generator().manual_seed(seed)
    noise = ids[torch.randint(0, len(ids), tokens.shape, generator=rng)].to(tokens.device)
    return torch.where(positions, noise, tokens)


def target_probability(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p(next token) at every prediction position: logits (..., T, V), tokens (..., T) -> (..., T-1)."""
    return logits[..., :-1, :].float().softmax(-1).gather(-1, tokens[..., 1:, None])[..., 0]


def patching_effects(
    model: torch.nn.Module | ModelAdapter,
    clean: dict[str, torch.Tensor],
    corrupted_tokens: torch.Tensor,
    clean_tokens: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    clean_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """e_ℓ per pair: (n_layers + 1, B).

    Args:
        clean: residual streams 0..L of the clean run, hook name -> (B, T, d_model), in `residual_sites` order.
        corrupted_tokens, clean_tokens: (B, T).
        positions: (B, T) bool, where the residual stream is patched.
        targets: (B, T-1) bool, the predictions whose clean target probability is read.
        clean_logits: the clean run's logits (B, T, V), when the caller has them: see below.

    A model whose adapter declares the fast paths `residual_streams`, `stream_from` and `forward_from` runs
    the corrupted input once, keeping its residual streams, and each patched stream re-runs only the
    blocks above it: the blocks below are the corrupted run's. The last block runs only at the
    predictions read, and the last site needs no block at all. Patching the embeddings wherever the
    two inputs differ gives the clean input itself, so when that holds for every prediction read
    (causally: no difference left at or before it), e_0 comes from `clean_logits` with no forward
    at all. Other models get one batched forward with a row group per patched stream.
    """
    adapter = adapter_for(model)
    clean = {name: resid.to(adapter.dtype) for name, resid in clean.items()}  # the cache may have been widened to float32
    rows, cols = targets.nonzero(as_tuple=True)  # the predictions read: (N,) each
    answers = clean_tokens[:, 1:][rows, cols]  # (N,)
    counts = targets.sum(-1).clamp_min(1).float()  # (B,)

    def read(picked: torch.Tensor) -> torch.Tensor:  # logits at the predictions read (..., N, V) -> mean p(target) per pair (..., B)
        p = picked.float().softmax(-1).gather(-1, answers.expand(*picked.shape[:-1])[..., None])[..., 0]  # (..., N)
        return torch.zeros(*p.shape[:-1], len(counts), device=p.device).index_add_(-1, rows, p) / counts

    if not all(adapter.supports(name) for name in FAST_PATHS):
        return _patching_effects_batched(adapter, clean, corrupted_tokens, positions, lambda logits: read(logits[..., rows, cols, :]))
    last = len(clean) - 1  # the last site: the last block's output
    corrupted = adapter.residual_streams(corrupted_tokens, n_blocks=last - 1)  # the streams entering each block
    final = adapter.stream_from(corrupted[-1], last - 1, at=(rows, cols))  # (N, d): the last block's output, where read
    logits = adapter.logits_from  # (N, d) -> (N, V)

    baseline = read(logits(final))
    effects = []
    for layer, resid in enumerate(clean.values()):
        if layer == 0 and clean_logits is not None and _embedding_patch_is_clean(corrupted_tokens, clean_tokens, positions, targets):
            effects.append(read(clean_logits[rows, cols]) - baseline)
        elif layer == last:  # nothing runs after it: patch the predictions read directly
            effects.append(read(logits(torch.where(positions[rows, cols, None], resid[rows, cols], final))) - baseline)
        else:
            patched = torch.where(positions[..., None], resid, corrupted[layer])
            effects.append(read(adapter.forward_from(patched, layer, at=(rows, cols))) - baseline)
    return torch.stack(effects)


def _embedding_patch_is_clean(corrupted_tokens, clean_tokens, positions, targets) -> bool:
    """Whether every prediction read sees the clean input once the embeddings are patched at `positions`."""
    patched = torch.where(positions, clean_tokens, corrupted_tokens)
    differs_so_far = (patched != clean_tokens).cumsum(-1) > 0  # (B, T): a difference at or before t
    return not bool((targets & differs_so_far[:, :-1]).any())


def _patching_effects_batched(adapter: ModelAdapter, clean, corrupted_tokens, positions, read) -> torch.Tensor:
    """One forward for all layers: row group g patches site g, the last group is the unpatched baseline."""
    B = corrupted_tokens.shape[0]
    n = len(clean)
    tokens = corrupted_tokens.repeat(n + 1, 1)  # ((n+1)·B, T)

    def patcher(group: int, resid: torch.Tensor):
        def patch(activation: torch.Tensor, hook) -> torch.Tensor:
            rows = slice(group * B, (group + 1) * B)
            activation[rows] = torch.where(positions[..., None], resid, activation[rows])
            return activation
        return patch

    hooks = [(name, patcher(group, resid)) for group, (name, resid) in enumerate(clean.items())]
    logits = adapter.run_with_hooks(tokens, hooks)  # ((n+1)·B, T, V)
    per_pair = read(logits.view(n + 1, B, *logits.shape[1:]))  # (n+1, B)
    return per_pair[:n] - per_pair[n]


CORRUPTIONS = ("noise", "partner")


@register_probe
class PatchingProbe(Probe):
    """`effect` per layer and `z_dependence` (mean over pairs of the largest per-layer effect).

    Options: `patch` (a token set), `read` (a prediction set), `corrupt` ("noise" or "partner"), `seed`
    (the noise); see the module docstring. The task declares the first three.
    """

    name = "patching"
    # n_layers + 2 extra forwards: measured on checkpoints only
    needs = Needs(parts=frozenset({"residual_patching"}), position_options=("patch", "read"), batch="induction", live=False)
    uses_logits = True  # the model's own logits spare it an unembedding (lens) or a clean forward (patching)

    def __init__(self, patch: str | None = None, read: str | None = None, corrupt: str = "noise", seed: int = 0):
        if corrupt not in CORRUPTIONS:
            raise ValueError(f"patching corrupt must be one of {CORRUPTIONS}, got {corrupt!r}")
        super().__init__(patch=patch, read=read, corrupt=corrupt, seed=seed)

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        return [site.hook for site in adapter.residual_sites]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        batch, opts = inputs.batch, self.options
        if not (opts["patch"] and opts["read"]):
            raise ValueError("patching needs options patch (a token set) and read (a prediction set); this task declares "
                             "none: set them, e.g. --probe-option patching.patch=source --probe-option patching.read=copy")
        positions = batch.token_positions(opts["patch"], "patching")  # (B, T)
        targets = batch.predictions(opts["read"], "patching")  # (B, T-1)
        if opts["corrupt"] == "partner":
            return self._partners(inputs, positions, targets)
        clean = {name: inputs.acts[name] for name in self.hook_names(inputs.adapter)}
        corrupted = corrupt_positions(batch.tokens, positions, inputs.adapter.tokenizer.ordinary_ids(), opts["seed"])
        effects = patching_effects(inputs.adapter, clean, corrupted, batch.tokens, positions, targets, clean_logits=inputs.logits)
        return [Measurement("effect", effects.mean(-1)), Measurement("z_dependence", effects.max(0).values.mean())]

    def _partners(self, inputs: ProbeInputs, positions: torch.Tensor, targets: torch.Tensor) -> list[Measurement]:
        """Patch the set of the partner (clean) into each paired row (corrupted), read p(partner's target)."""
        batch = inputs.batch
        if batch.pair_index is None:
            raise ValueError("patching corrupt=partner needs a batch whose rows are paired (pair_index)")
        ones = (batch.pair_index >= 0).nonzero()[:, 0]  # (P,) rows that have a partner
        if len(ones) == 0:
            return []
        twos = batch.pair_index[ones]  # (P,)
        clean = {name: inputs.acts[name][twos] for name in self.hook_names(inputs.adapter)}
        logits = None if inputs.logits is None else inputs.logits[twos]
        effects = patching_effects(inputs.adapter, clean, batch.tokens[ones], batch.tokens[twos], positions[ones], targets[ones],
                                   clean_logits=logits)
        return [Measurement("effect", effects.mean(-1)), Measurement("z_dependence", effects.max(0).values.mean())]
