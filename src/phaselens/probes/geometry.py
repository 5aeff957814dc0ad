"""Residual-stream geometry: interaction energy per layer and the pull of predictions toward the unigram.

Interaction energy of a sequence's n residual vectors, IE = (1/n²) Σ_i Σ_j exp(β·cos(x_i, x_j)),
lies in [e^{-β}, e^{β}]: e^{β} when every position points the same way, ~1 when the directions
are spread out. `kl_unigram` = mean over predictions of KL(p_model ‖ p_unigram): near 0 while a
model only predicts token frequencies, growing as it uses the context.

Layers are residual streams (`models.sites`), as in the logit lens: 0 is the embeddings, ℓ the
stream after block ℓ−1, and L+1 the stream after the final norm (before its learned scale and bias).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from phaselens.models.adapter import ModelAdapter
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
from phaselens.store.unigram import UNIGRAM_FILE, read_unigram_counts, unigram_path


def interaction_energy(resid: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """IE per leading index, averaged over sequences: resid (..., B, T, d) -> (...).

    One batched matrix product of unit vectors gives every cosine of every sequence at once.
    """
    unit = torch.nn.functional.normalize(resid.float(), dim=-1)  # (..., B, T, d); a zero vector stays 0
    cos = unit @ unit.transpose(-1, -2)  # (..., B, T, T)
    return torch.exp(beta * cos).mean(dim=(-1, -2)).mean(-1)  # (...)


def unigram_log_probs(counts: torch.Tensor, d_vocab: int, smoothing: float = 1.0) -> torch.Tensor:
    """log p_unigram (d_vocab,) from token counts, with `smoothing` added to every count (no zero mass).

    Counts shorter than the vocabulary (a tokenizer smaller than a padded embedding) count 0 beyond.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if counts.numel() > d_vocab:
        raise ValueError(f"unigram counts cover {counts.numel()} tokens but the model's vocabulary has {d_vocab}")
    if (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError("unigram counts must be finite and >= 0")
    if smoothing <= 0 and (counts == 0).any():
        raise ValueError("unigram smoothing must be > 0 when some token has count 0 (KL would be infinite)")
    full = torch.zeros(d_vocab, dtype=torch.float64)
    full[: counts.numel()] = counts
    full += smoothing
    return (full / full.sum()).log().float()


def kl_to_unigram(logits: torch.Tensor, log_unigram: torch.Tensor, mask: torch.Tensor | None = None,
                  reverse: bool = False) -> torch.Tensor:
    """Mean over masked positions of KL(p_model ‖ p_unigram) (or KL(p_unigram ‖ p_model) with `reverse`).

    logits (B, T, V), log_unigram (V,), mask (B, T) bool or None for every position -> () nats.
    """
    logp = logits.float().log_softmax(-1)  # (B, T, V)
    return kl_from_log_probs(logp, logp.exp(), log_unigram, mask, reverse)


def kl_from_log_probs(logp: torch.Tensor, p: torch.Tensor, log_unigram: torch.Tensor, mask: torch.Tensor | None = None,
                      reverse: bool = False) -> torch.Tensor:
    """`kl_to_unigram` from the model's log-probabilities and probabilities, (B, T, V) each -> () nats.

    KL(p ‖ q) = Σ p log p − p·log q: two reads of (B, T, V), no temporary of that size.
    """
    logq = log_unigram.to(logp.device)  # (V,)
    if reverse:
        kl = (logq.exp() * (logq - logp)).sum(-1)  # (B, T)
    else:
        kl = torch.linalg.vecdot(p, logp) - p @ logq  # (B, T)
    if mask is None:
        return kl.mean()
    weights = mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum()


@register_probe
class GeometryProbe(Probe):
    """`interaction_energy` per layer (0 = embeddings … L+1 = after the final norm) and `kl_unigram`.

    Args:
        beta: inverse temperature β of the interaction energy.
        unigram: token counts (a list or tensor) or a JSON counts file; default: the run's
            `unigram.json` (training-data counts), found when the probe measures a run.
        smoothing: added to every count before normalising, so no token has zero mass.
        reverse: also report `kl_unigram_reverse` = KL(p_unigram ‖ p_model).
        kl: False measures the interaction energy only (no counts needed).
        every: live, measure only at steps that are a multiple of this (checkpoints: always).
    """

    name = "geometry"
    needs = Needs(run_files=("unigram",))  # the training data's token counts, for kl_unigram
    off_thread = True  # reads activations and the batch only
    needs_logits = True

    def __init__(self, beta: float = 1.0, unigram: str | Path | Sequence[float] | torch.Tensor | None = None,
                 smoothing: float = 1.0, reverse: bool = False, kl: bool = True, every: int = 1):
        if every < 1:
            raise ValueError(f"geometry every must be >= 1, got {every}")
        super().__init__(beta=beta, smoothing=smoothing, reverse=reverse, kl=kl, every=every)
        self.every = every
        self._counts = None if unigram is None else self._load_counts(unigram)
        self._log_unigram: torch.Tensor | None = None

    @staticmethod
    def _load_counts(unigram) -> torch.Tensor:
        if isinstance(unigram, (str, Path)):
            unigram = read_unigram_counts(unigram)
        return torch.as_tensor(unigram, dtype=torch.float64)

    def bind_run(self, run_dir: Path) -> None:
        """Use the run's training-data token counts unless counts were given."""
        path = unigram_path(run_dir)
        if self._counts is None and path.is_file():
            self._counts = self._load_counts(path)
            self._log_unigram = None

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        """Every residual stream, and the stream after the final norm where the model has one (BDH has none)."""
        final = adapter.final_norm_site
        return [site.hook for site in adapter.residual_sites + ((final,) if final else ())]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        opts = self.options
        resid = torch.stack([inputs.acts[name] for name in self.hook_names(inputs.adapter)])  # (L+2 or L+1, B, T, d)
        measurements = [Measurement("interaction_energy", interaction_energy(resid, opts["beta"]))]
        if not opts["kl"]:
            return measurements
        logp, p = inputs.next_token_probs()  # (B, T-1, V) each: the predictions the task's loss mask covers
        log_unigram = self._unigram(logp.shape[-1])
        mask = inputs.batch.loss_mask
        measurements.append(Measurement("kl_unigram", kl_from_log_probs(logp, p, log_unigram, mask)))
        if opts["reverse"]:
            measurements.append(Measurement("kl_unigram_reverse", kl_from_log_probs(logp, p, log_unigram, mask, reverse=True)))
        return measurements

    def _unigram(self, d_vocab: int) -> torch.Tensor:
        if self._counts is None:
            raise ValueError(
                "geometry: kl_unigram needs the training data's token counts; pass GeometryProbe(unigram=COUNTS_OR_FILE), "
                f"measure a run that has {UNIGRAM_FILE}, or use GeometryProbe(kl=False) for the interaction energy only"
            )
        if self._log_unigram is None or self._log_unigram.shape[0] != d_vocab:
            self._log_unigram = unigram_log_probs(self._counts, d_vocab, self.options["smoothing"])
        return self._log_unigram
