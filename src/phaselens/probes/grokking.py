"""Progress measures of grokking on modular addition (Nanda et al. 2023, "Progress measures for grokking").

A model that adds modulo p by the Fourier algorithm embeds each number as waves cos(w_k a), sin(w_k a)
at a few key frequencies w_k = 2πk/p and computes cos(w_k(a + b − c)) in its logits. These measures
follow that circuit while it forms, before test loss moves:

* the embedding's norm per frequency k = 1..(p−1)/2 in the Fourier basis over Z_p (an artifact),
  the key frequencies, their share of the squared norm (`key_frequency_share`) and the Gini
  coefficient of the norms (`fourier_gini`: 0 spread evenly, → 1 on a few frequencies);
* `restricted_loss`: the loss over all p² pairs when the logits keep, in the 2D Fourier basis over
  (a, b), only the constant term and the four terms cos/sin(w_k a)·cos/sin(w_k b) of each key
  frequency (those that make up cos(w_k(a+b)) and sin(w_k(a+b))): it falls as the circuit forms;
* `excluded_loss`: the loss on the training pairs when exactly those key-frequency terms are
  removed: it rises as the training loss comes to rest on the circuit rather than on memorisation;
* `weight_norm`: the L2 norm of all parameters, which weight decay shrinks during clean-up.

Key frequencies (the rule): k is key at a measured step when its squared norm is at least `key_ratio`
(default 3) times the median squared norm over all frequencies. At initialisation no frequency stands
out (a random embedding's squared norms are chi-square with 2·d_model degrees of freedom: the largest
is within ~30% of the median for d_model ≥ 64), so there are none; as the circuit forms, its
frequencies cross the line one by one, and a trained model has a handful. Restricted and excluded
loss use the key frequencies of the step they measure, so they can be computed live; the option
`key_frequencies` fixes a set instead (e.g. the final model's, as in the paper).

The probe reads batches `a b = c` over Z_p (the `modular_addition` task): p is the id of the `=`
token, the prediction of c is the position set `answer`, and the set `train_pairs` marks the answers
of training pairs. Its logits over all p² pairs come from the measured forward when the batch is
the whole grid (the probe batch), else from one extra no-grad forward of the grid.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from phaselens.models.adapter import adapter_for
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe

KEY_RATIO = 3.0  # a key frequency's squared norm is at least this many times the median's


# ---------------------------------------------------------------------------- the Fourier basis over Z_p


def fourier_basis(p: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal Fourier basis of functions on Z_p (p odd) and the frequency of each row.

    Rows: the constant 1/√p, then cos(2πkx/p)·√(2/p) and sin(2πkx/p)·√(2/p) for k = 1..(p−1)/2.
    Returns (basis (p, p): row i is a function of x, frequencies (p,) long: 0 for the constant, k for the waves).
    """
    if p < 3 or p % 2 == 0:
        raise ValueError(f"the Fourier basis here needs an odd p >= 3, got {p}")
    x = torch.arange(p, dtype=torch.float64, device=device)  # (p,)
    k = torch.arange(1, (p - 1) // 2 + 1, dtype=torch.float64, device=device)  # (K,)
    angle = 2 * math.pi * k[:, None] * x[None, :] / p  # (K, p)
    waves = torch.stack((angle.cos(), angle.sin()), dim=1).reshape(p - 1, p) * math.sqrt(2 / p)  # (2K, p): cos_1, sin_1, ...
    basis = torch.cat((torch.full((1, p), 1 / math.sqrt(p), dtype=torch.float64, device=device), waves))  # (p, p)
    frequencies = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(1, (p - 1) // 2 + 1).repeat_interleave(2)))
    return basis.float(), frequencies.to(device)


def fourier_norms(embedding: torch.Tensor) -> torch.Tensor:
    """The norm of the embedding at each frequency k = 1..(p−1)/2: embedding (p, d) -> (K,).

    norm_k = ‖(cos_k · E, sin_k · E)‖₂, the length of E's component in frequency k's two-dimensional subspace.
    """
    p = embedding.shape[0]
    basis, _ = fourier_basis(p, embedding.device)
    components = basis @ embedding.float()  # (p, d): row i = the embedding's coefficient on basis row i
    per_row = components.pow(2).sum(-1)  # (p,)
    return per_row[1:].view(-1, 2).sum(-1).sqrt()  # (K,): cos and sin of each frequency together


def key_frequencies(norms: torch.Tensor, key_ratio: float = KEY_RATIO) -> torch.Tensor:
    """Frequencies whose squared norm is at least `key_ratio` × the median squared norm: norms (K,) -> (n,) long, 1-based."""
    energy = norms.float().pow(2)  # (K,)
    threshold = key_ratio * energy.median()
    return (torch.nonzero(energy >= threshold).flatten() + 1) if threshold > 0 else torch.nonzero(energy > 0).flatten() + 1


def key_frequency_share(norms: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Share of the squared norm that the key frequencies carry: norms (K,), keys (n,) 1-based -> ()."""
    energy = norms.float().pow(2)  # (K,)
    return energy[keys - 1].sum() / energy.sum()


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of non-negative values: (n,) -> (); 0 when all are equal, (n−1)/n when one holds everything.

    G = Σ_i (2i − n − 1)·x_(i) / (n·Σ x), with x_(1) ≤ … ≤ x_(n) sorted ascending and i = 1..n.
    """
    x = values.float().sort().values  # (n,)
    n = x.numel()
    rank = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)  # (n,)
    return ((2 * rank - n - 1) * x).sum() / (n * x.sum())


# ---------------------------------------------------------------------------- logits in the 2D Fourier basis


def key_term_mask(p: int, keys: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Which terms of the 2D Fourier basis over (a, b) belong to the key frequencies: (p, p) bool.

    Term (i, j) is basis row i in a times basis row j in b; it is a key term when both rows have the
    same key frequency k (cos/sin(w_k a) · cos/sin(w_k b): four terms per k, which span cos(w_k(a+b)),
    sin(w_k(a+b)) and their difference-frequency partners).
    """
    _, freq = fourier_basis(p, device)
    is_key = torch.isin(freq, keys.to(freq.device))  # (p,)
    return (freq[:, None] == freq[None, :]) & is_key[:, None] & is_key[None, :]


def keep_fourier_terms(grid_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits with every 2D Fourier term over (a, b) outside `keep` set to zero: (p, p, V), keep (p, p) -> (p, p, V).

    The basis is orthonormal, so this is the orthogonal projection onto the kept terms, per output class.
    """
    p = grid_logits.shape[0]
    basis, _ = fourier_basis(p, grid_logits.device)  # (p, p)
    coefficients = torch.einsum("ia,abv,jb->ijv", basis, grid_logits.float(), basis)  # (p, p, V)
    return torch.einsum("ia,ijv,jb->abv", basis, coefficients * keep[..., None], basis)  # (p, p, V)


def restricted_logits(grid_logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Only the constant term and the key-frequency terms of the logits: (p, p, V) -> (p, p, V)."""
    p = grid_logits.shape[0]
    keep = key_term_mask(p, keys, grid_logits.device)
    keep[0, 0] = True  # the constant term
    return keep_fourier_terms(grid_logits, keep)


def excluded_logits(grid_logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The logits without their key-frequency terms: (p, p, V) -> (p, p, V)."""
    p = grid_logits.shape[0]
    return keep_fourier_terms(grid_logits, ~key_term_mask(p, keys, grid_logits.device))


def modular_sum_loss(grid_logits: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the answer (a + b) mod p over the pairs in `pairs` (all when None): (p, p, V) -> ().

    pairs: (p, p) bool over (a, b).
    """
    p, _, V = grid_logits.shape
    a = torch.arange(p, device=grid_logits.device)
    answers = (a[:, None] + a[None, :]) % p  # (p, p)
    losses = F.cross_entropy(grid_logits.reshape(-1, V).float(), answers.reshape(-1), reduction="none").view(p, p)
    return losses.mean() if pairs is None else losses[pairs].mean()


def weight_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all parameters together: sqrt(Σ θ²) -> ()."""
    return torch.stack([w.detach().float().pow(2).sum() for w in parameters]).sum().sqrt()


# ---------------------------------------------------------------------------- the probe


def grid_tokens(p: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every input `a b =` over Z_p, row a·p + b: (p², 3) long (`=` is token p)."""
    a, b = torch.meshgrid(torch.arange(p, device=device), torch.arange(p, device=device), indexing="ij")
    return torch.stack((a.reshape(-1), b.reshape(-1), torch.full((p * p,), p, device=device)), dim=1)


@register_probe
class GrokkingProbe(Probe):
    """`restricted_loss`, `excluded_loss`, `weight_norm`, `fourier_gini`, `key_frequency_share` of a modular-addition model.

    Options: `answer` and `train`, the position sets it reads (the task declares them); `key_ratio`
    (default 3, see the module docstring); `key_frequencies`, a fixed list (e.g. the final model's)
    instead of the ones found at each measured step. The artifact holds the per-frequency norms and
    the key frequencies.
    """

    name = "grokking"
    needs = Needs(position_options=("answer", "train"))
    needs_logits = True
    checkpoint_artifacts = True  # the report reads the key frequencies of the last checkpoint

    def __init__(self, answer: str = "answer", train: str = "train_pairs", key_ratio: float = KEY_RATIO,
                 key_frequencies: Sequence[int] | None = None):
        if not key_ratio > 1:
            raise ValueError(f"grokking key_ratio must be > 1 (a key frequency stands out from the median), got {key_ratio}")
        fixed = None if key_frequencies is None else [int(k) for k in key_frequencies]
        super().__init__(answer=answer, train=train, key_ratio=float(key_ratio), key_frequencies=fixed)
        self.fixed_keys = None if fixed is None else torch.tensor(fixed, dtype=torch.long)

    def _grid(self, inputs: ProbeInputs) -> tuple[int, torch.Tensor, torch.Tensor]:
        """p, the logits at the answer over all p² pairs (p, p, V), and the training pairs (p, p) bool."""
        batch = inputs.batch
        answer = batch.predictions(self.options["answer"], "probe 'grokking'")  # (B, T-1)
        if batch.tokens.shape[1] < 3 or not bool((answer.sum(-1) == 1).all()):
            raise ValueError("probe 'grokking' reads inputs `a b =` with one answer per row (the modular_addition task)")
        tokens = batch.tokens
        p = int(tokens[0, 2])  # the `=` token is p
        if p < 3 or not bool((tokens[:, 2] == p).all()) or int(tokens[:, :2].max()) >= p:
            raise ValueError("probe 'grokking' reads inputs `a b =` over Z_p, `=` being token p (the modular_addition task)")
        rows = torch.arange(len(batch), device=tokens.device)
        position = answer.int().argmax(-1)  # (B,)
        if len(batch) == p * p and torch.equal(tokens[:, :3], grid_tokens(p, tokens.device)):
            logits = inputs.logits[rows, position]  # (p², V): the measured forward is the whole grid
        else:
            was_training = inputs.model.training
            inputs.model.eval()
            try:
                logits = adapter_for(inputs.model).logits(grid_tokens(p, tokens.device))[:, 2]  # (p², V)
            finally:
                inputs.model.train(was_training)
        train = batch.predictions(self.options["train"], "probe 'grokking'").any(-1)  # (B,)
        pairs = torch.zeros(p, p, dtype=torch.bool, device=tokens.device)
        pairs[tokens[train, 0], tokens[train, 1]] = True
        return p, logits.view(p, p, -1), pairs

    def _embedding(self, model: torch.nn.Module, p: int) -> torch.Tensor:
        return adapter_for(model).embedding()[:p]  # (p, d_model): the number tokens

    def _keys(self, norms: torch.Tensor) -> torch.Tensor:
        if self.fixed_keys is not None:
            return self.fixed_keys.to(norms.device)
        return key_frequencies(norms, self.options["key_ratio"])

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        p, logits, pairs = self._grid(inputs)
        norms = fourier_norms(self._embedding(inputs.model, p))  # (K,)
        keys = self._keys(norms)
        return [
            Measurement("restricted_loss", modular_sum_loss(restricted_logits(logits, keys))),
            Measurement("excluded_loss", modular_sum_loss(excluded_logits(logits, keys), pairs)),
            Measurement("weight_norm", weight_norm(inputs.model.parameters())),
            Measurement("fourier_gini", gini(norms)),
            Measurement("key_frequency_share", key_frequency_share(norms, keys)),
        ]

    def artifact(self, inputs: ProbeInputs) -> dict[str, Any]:
        """{"p", "frequencies": 1..K, "norms": per frequency, "key_frequencies", "key_ratio"}."""
        p = int(inputs.batch.tokens[0, 2])
        norms = fourier_norms(self._embedding(inputs.model, p))
        return {"p": p, "frequencies": list(range(1, len(norms) + 1)), "norms": [round(float(v), 6) for v in norms],
                "key_frequencies": [int(k) for k in self._keys(norms)], "key_ratio": self.options["key_ratio"]}
