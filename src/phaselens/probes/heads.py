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
    rows = detection.any(-1).to(pattern.dtype)  # (B, Q)
    d = detection.to(pattern.dtype)[:, None]  # (B, 1, Q, K)
    hit = (pattern * d).sum(-1)  # (..., B, H, Q)
    total = pattern.sum(-1) * rows[:, None]  # (..., B, H, Q)
    return hit.sum(dim=(-3, -1)) / total.sum(dim=(-3, -1)).clamp_min(torch.finfo(pattern.dtype).tiny)


@register_probe
class HeadsProbe(Probe):
    """Induction, previous-token and duplicate-token scores per head on the probe batch."""

    name = "heads"

    def __init__(self, **options):
        super().__init__(**options)
        self._cached_tokens: torch.Tensor | None = None
        self._cached_patterns: dict[str, torch.Tensor] = {}

    def hook_names(self, n_layers: int) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    def _detection(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        # The probe batch is fixed for a run: build its detection patterns once.
        if self._cached_tokens is None or self._cached_tokens is not tokens:
            self._cached_tokens = tokens
            self._cached_patterns = detection_patterns(tokens)
        return self._cached_patterns

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        detection = self._detection(inputs.batch.tokens)
        return [Measurement(name, head_score(patterns, detection[name])) for name in HEAD_SCORES]
