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

import functools

import torch

from phaselens.models.adapter import ModelAdapter
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe

HEAD_SCORES = ("induction", "prev_token", "duplicate")
_CHANNELS = ("induction", "duplicate", "prev_token")  # order in `detection_stack`: token-matching ones first


@functools.lru_cache(maxsize=16)
def _position_masks(T: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(before, prev): j < i and j = i − 1, as (T, T) of `dtype`; the same for every batch."""
    with torch.inference_mode(False):  # cached across calls: must stay usable outside inference mode
        i = torch.arange(T, device=device)
        return (i[None, :] < i[:, None]).to(dtype), (i[None, :] == i[:, None] - 1).to(dtype)


@functools.lru_cache(maxsize=16)
def _no_token(B: int, device: torch.device) -> torch.Tensor:
    """(B, 1) of −1: the token 'before' position 0, equal to no real token."""
    with torch.inference_mode(False):
        return torch.full((B, 1), -1, dtype=torch.int32, device=device)


def detection_stack(tokens: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Every detection pattern D at once: tokens (B, T) -> (B, S, T, T) of `dtype`, channels in `_CHANNELS` order."""
    B, T = tokens.shape
    before, prev = _position_masks(T, tokens.device, dtype)
    ids = tokens.to(torch.int32)  # exact for any vocabulary, and compares 2.5x faster than int64 on CPU
    # Key j matches query i on tok_{j-1} (induction) or on tok_j (duplicate): one comparison
    # fills both channels, then both keep only keys before the query.
    keys = torch.cat((_no_token(B, tokens.device), ids[:, :-1], ids), dim=1).view(B, 2, 1, T)
    detection = torch.empty(B, len(_CHANNELS), T, T, dtype=dtype, device=tokens.device)
    torch.eq(ids.reshape(B, 1, T, 1), keys, out=detection[:, :2]).mul_(before)  # (B, 2, Q, K)
    detection[:, 2] = prev
    return detection


def detection_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detection pattern D of each head score: tokens (B, T) -> {name: (B, T, T) bool}."""
    detection = detection_stack(tokens)
    return {name: detection[:, _CHANNELS.index(name)] for name in HEAD_SCORES}


def head_score(pattern: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
    """Σ(A⊙D)/ΣA over rows where D has a target: pattern (..., B, H, Q, K), D (B, Q, K) -> (..., H)."""
    return head_scores(pattern, detection[:, None])[..., 0]


def head_scores(pattern: torch.Tensor, detections: torch.Tensor) -> torch.Tensor:
    """Several head scores in one pass: pattern (..., B, H, Q, K), D (B, S, Q, K) -> (..., H, S)."""
    B, S, Q, K = detections.shape
    H = pattern.shape[-3]
    d = detections.to(pattern.dtype)  # free when D was built in this dtype
    rows = d.amax(-1)  # (B, S, Q): 1 on rows with a target
    patterns = pattern.reshape(-1, B, H, Q * K)  # (N, B, H, Q·K)
    d = d.reshape(B, S, Q * K)
    # One (S, Q·K) @ (Q·K, H) product per sequence and leading index: the pattern is read as it
    # lies (transposed, not copied), and D is not broadcast (which would copy it once per layer).
    hit = patterns.new_empty(patterns.shape[0], B, S, H)
    for n, p in enumerate(patterns):
        torch.bmm(d, p.transpose(1, 2), out=hit[n])
    row_mass = pattern.sum(-1).view(-1, B, H, Q).transpose(-1, -2)  # (N, B, Q, H)
    total = torch.matmul(rows, row_mass).sum(1)  # (N, S, H)
    # + tiny, not a clamp: identical for any real total, and 0/tiny = 0 where no row has a target.
    scores = hit.sum(1).div_(total.add_(torch.finfo(pattern.dtype).tiny))  # (N, S, H)
    return scores.transpose(-1, -2).reshape(*pattern.shape[:-4], H, S)


@register_probe
class HeadsProbe(Probe):
    """Induction, previous-token and duplicate-token scores per head on the probe batch."""

    name = "heads"
    needs = Needs(parts=frozenset({"attention_patterns"}), batch="induction")
    option_names = ()  # none: it reads every head on the batch the study routes it to
    off_thread = True  # reads activations and the batch only

    def __init__(self, **options):
        super().__init__(**options)
        self._cached_tokens: torch.Tensor | None = None
        self._cached_key: tuple | None = None
        self._cached_detection: torch.Tensor | None = None

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        return [adapter.pattern_hook(layer) for layer in range(adapter.n_layers)]

    def _detection(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # A fixed probe batch is measured at every checkpoint: build its patterns once. The cache
        # holds the tensor itself (so its memory cannot be reused by another batch) and its version
        # counter (so a buffer refilled in place is not mistaken for it).
        key = (tokens._version, dtype)
        if self._cached_tokens is not tokens or self._cached_key != key:
            with torch.inference_mode(False):  # kept across calls: must stay usable outside inference mode
                detection = detection_stack(tokens, dtype)  # (B, S, Q, K)
            self._cached_tokens, self._cached_key, self._cached_detection = tokens, key, detection
        assert self._cached_detection is not None
        return self._cached_detection

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        patterns = inputs.stack("blocks.{}.attn.hook_pattern")  # (L, B, H, Q, K)
        scores = head_scores(patterns, self._detection(inputs.batch.tokens, patterns.dtype)).unbind(-1)  # S x (L, H)
        return [Measurement(name, scores[_CHANNELS.index(name)]) for name in HEAD_SCORES]
