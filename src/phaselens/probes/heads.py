"""Head scores: how much of a head's attention lands where a known mechanism would put it.

score = Σ(A ⊙ D) / ΣA over the rows where the detection pattern D has a target, pooled over
the batch. D marks, for query i and key j:
  prev_token  j = i − 1
  duplicate   tok_j = tok_i, j < i
  induction   tok_{j−1} = tok_i, 1 <= j <= i − 1 (the token after an earlier copy of tok_i)
Measured on a batch with a segment repeated at a variable offset, where only an induction
mechanism (not a positional one) attends to the right place.
"""

from __future__ import annotations

import torch

from phaselens.probes.base import Measurement, Probe, ProbeInputs, register_probe

HEAD_SCORES = ("induction", "prev_token", "duplicate")


def detection_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detection pattern D of each head score: tokens (B, T) -> {name: (B, T, T) bool}."""
    B, T = tokens.shape
    i = torch.arange(T, device=tokens.device)
    before = i[None, :] < i[:, None]  # (Q, K): j < i
    same = tokens[:, :, None] == tokens[:, None, :]  # (B, Q, K): tok_i == tok_j
    prev = (i[None, :] == i[:, None] - 1).expand(B, T, T)  # (B, Q, K)
    duplicate = same & before
    # induction: key j is right after an earlier copy of tok_i, i.e. tok_{j-1} == tok_i, j <= i-1
    after_copy = torch.zeros_like(same)
    after_copy[:, :, 1:] = same[:, :, :-1]  # after_copy[b, i, j] = (tok_i == tok_{j-1})
    induction = after_copy & (i[None, :] <= i[:, None] - 1)
    return {"induction": induction, "prev_token": prev, "duplicate": duplicate}


def head_score(pattern: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
    """Σ(A⊙D)/ΣA over rows where D has a target: pattern (..., B, H, Q, K), D (B, Q, K) -> (..., H)."""
    return head_scores(pattern, detection[None])[..., 0]


def head_scores(pattern: torch.Tensor, detections: torch.Tensor) -> torch.Tensor:
    """Several head scores in one contraction: pattern (..., B, H, Q, K), D (S, B, Q, K) -> (..., H, S)."""
    d = detections.to(pattern.dtype)  # (S, B, Q, K)
    rows = detections.any(-1).to(pattern.dtype)  # (S, B, Q): rows with a target
    hit = torch.einsum("...bhqk,sbqk->...hs", pattern, d)
    total = torch.einsum("...bhq,sbq->...hs", pattern.sum(-1), rows)
    return hit / total.clamp_min(torch.finfo(pattern.dtype).tiny)


@register_probe
class HeadsProbe(Probe):
    """Induction, previous-token and duplicate-token scores per head on the probe batch."""

    name = "heads"

    def __init__(self, **options):
        super().__init__(**options)
        self._cached_key: tuple | None = None
        self._cached_patterns: torch.Tensor | None = None

    def hook_names(self, n_layers: int) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    def _detection(self, tokens: torch.Tensor) -> torch.Tensor:
        # A fixed probe batch is measured at every checkpoint: build its patterns once.
        # The key includes the version counter, so a buffer refilled in place is not mistaken for it.
        key = (tokens.data_ptr(), tokens._version, tuple(tokens.shape), tokens.device)
        if self._cached_key != key:
            patterns = detection_patterns(tokens)
            self._cached_key = key
            self._cached_patterns = torch.stack([patterns[name] for name in HEAD_SCORES])  # (S, B, Q, K)
        return self._cached_patterns

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        detection = self._detection(inputs.batch.tokens)
        scores = head_scores(patterns, detection)  # (L, H, S)
        return [Measurement(name, scores[..., i]) for i, name in enumerate(HEAD_SCORES)]
