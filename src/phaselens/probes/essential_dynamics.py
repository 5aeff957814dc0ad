"""The `essential_dynamics` probe: each checkpoint's outputs on the probe batch as one vector.

Essential dynamics (Hoogland et al. 2024, Carroll et al. 2025) reads developmental stages off the PCA of
these vectors across checkpoints; that PCA is a series-level computation (`analysis.essential_dynamics`),
so per checkpoint this probe only records the vector (its artifact) and its mean (`logprob_mean`, the row
that marks the checkpoint measured).
"""

from __future__ import annotations

from typing import Any

import torch

from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
from phaselens.store.essential_dynamics import OutputVector

OUTPUTS = ("logprob", "logits")


def correct_logprobs(log_probs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(next token) at every predicted position: log_probs (B, T-1, V), tokens (B, T), mask (B, T-1) -> (N,)."""
    picked = log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # (B, T-1)
    return picked[mask]  # (N,), row-major


def spread(n: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """k indices spread evenly over range(n) (all of them when k >= n): a fixed subset, the same at every checkpoint."""
    if k >= n:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, k, device=device).round().long()


def subset_logprobs(log_probs: torch.Tensor, mask: torch.Tensor, positions: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `vocab` evenly spread token ids at `positions` evenly spread predicted positions:
    log_probs (B, T-1, V), mask (B, T-1) -> values (positions·vocab,), token ids (vocab,)."""
    rows = log_probs[mask]  # (N, V)
    ids = spread(rows.shape[-1], vocab, rows.device)  # (v,)
    return rows[spread(rows.shape[0], positions, rows.device)][:, ids].reshape(-1), ids  # (p·v,)


@register_probe
class EssentialDynamicsProbe(Probe):
    """Each checkpoint's output vector on the probe batch, for the PCA across checkpoints.

    Options:
        output: "logprob" (default): log p of the correct next token at every predicted position (the loss
            mask, row-major), D = the number of predictions. "logits": the full next-token distribution on a
            subset, the log-softmax of the logits (raw logits carry a free shift per position, which the PCA
            would read as movement) at `positions` predicted positions × `vocab` token ids, each evenly spread.
        positions, vocab: the subset's size for "logits" (defaults 64 and 32).

    Metric: `logprob_mean` per model, the mean of the vector. The vector itself is the artifact
    (`store.essential_dynamics`); `pc1`–`pc3` and `turning` are written once all checkpoints are measured.
    """

    name = "essential_dynamics"
    needs = Needs(live=False)
    needs_logits = True
    off_thread = True
    checkpoint_artifacts = True  # the vectors are the measurement: training writes them at every checkpoint too

    def __init__(self, output: str = "logprob", positions: int = 64, vocab: int = 32):
        if output not in OUTPUTS:
            raise ValueError(f"essential_dynamics output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if int(positions) < 1 or int(vocab) < 1:
            raise ValueError(f"essential_dynamics positions and vocab must be at least 1, got {positions} and {vocab}")
        super().__init__(output=output, positions=int(positions), vocab=int(vocab))

    def vector(self, inputs: ProbeInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This checkpoint's output vector (D,) and, for "logits", the token ids it covers."""
        log_probs, _ = inputs.next_token_probs()  # (B, T-1, V), shared with the loss probe
        batch = inputs.batch
        if self.options["output"] == "logprob":
            return correct_logprobs(log_probs, batch.tokens, batch.loss_mask), None
        return subset_logprobs(log_probs, batch.loss_mask, self.options["positions"], self.options["vocab"])

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        values, _ = self.vector(inputs)
        return [Measurement("logprob_mean", values.mean())]

    def artifact(self, inputs: ProbeInputs) -> dict[str, Any]:
        values, ids = self.vector(inputs)
        n_positions = int(values.numel() if ids is None else values.numel() // len(ids))
        return OutputVector(step=-1, output=self.options["output"], positions=n_positions,
                            vocab=None if ids is None else ids.tolist(),
                            values=[round(v, 5) for v in values.float().cpu().tolist()]).to_json()
