"""The grokking progress measures on hand-computable cases (one function per formula)."""

from __future__ import annotations

import math

import pytest
import torch

from phaselens.probes.grokking import (
    excluded_logits,
    fourier_basis,
    fourier_norms,
    gini,
    key_frequencies,
    key_frequency_share,
    modular_sum_loss,
    restricted_logits,
    weight_norm,
)


def wave(p: int, k: int, x: torch.Tensor, kind: str = "cos") -> torch.Tensor:
    angle = 2 * math.pi * k * x.double() / p
    return (angle.cos() if kind == "cos" else angle.sin()).float()


@pytest.mark.parametrize("p", [5, 7, 13])
def test_fourier_basis_is_orthonormal_with_the_constant_first(p):
    basis, freq = fourier_basis(p)
    assert torch.allclose(basis @ basis.T, torch.eye(p), atol=1e-5)
    assert torch.allclose(basis[0], torch.full((p,), 1 / math.sqrt(p)))
    assert freq.tolist() == [0] + [k for k in range(1, (p - 1) // 2 + 1) for _ in range(2)]


def test_fourier_basis_refuses_an_even_modulus():
    with pytest.raises(ValueError, match="odd p"):
        fourier_basis(8)


def test_fourier_norms_put_a_single_wave_at_its_frequency():
    p = 11
    x = torch.arange(p)
    embedding = torch.zeros(p, 3)
    embedding[:, 0] = wave(p, 2, x)  # ‖cos_2‖ = √(p/2)
    embedding[:, 2] = 2 * wave(p, 4, x, "sin")  # ‖2 sin_4‖ = 2√(p/2)
    norms = fourier_norms(embedding)
    expected = torch.zeros(5)
    expected[1], expected[3] = math.sqrt(p / 2), 2 * math.sqrt(p / 2)
    assert torch.allclose(norms, expected, atol=1e-4)


def test_fourier_norms_ignore_the_constant():
    assert torch.allclose(fourier_norms(torch.full((7, 4), 3.0)), torch.zeros(3), atol=1e-5)


def test_gini_of_even_and_concentrated_values():
    assert float(gini(torch.ones(4))) == pytest.approx(0.0, abs=1e-6)
    assert float(gini(torch.tensor([0.0, 0.0, 0.0, 1.0]))) == pytest.approx(3 / 4)
    # sorted 1, 2, 3: Σ(2i − n − 1)x = −2·1 + 0·2 + 2·3 = 4, over n·Σx = 18
    assert float(gini(torch.tensor([3.0, 1.0, 2.0]))) == pytest.approx(4 / 18)


def test_key_frequencies_stand_out_from_the_median():
    norms = torch.tensor([1.0, 1.0, 1.1, 5.0, 0.9, 3.5])  # squared: 1, 1, 1.21, 25, 0.81, 12.25; lower median 1
    assert key_frequencies(norms).tolist() == [4, 6]
    assert key_frequencies(norms, key_ratio=20).tolist() == [4]
    assert key_frequencies(torch.ones(8)).tolist() == []  # nothing stands out: no key frequency


def test_key_frequency_share_is_a_share_of_the_squared_norm():
    assert float(key_frequency_share(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([3]))) == pytest.approx(9 / 10)


def grid(p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(p), indexing="ij")
    return a, b, c


def test_restricted_logits_keep_the_key_wave_and_excluded_logits_keep_the_rest():
    p = 7
    a, b, c = grid(p)
    circuit = wave(p, 2, a + b - c)  # the Fourier algorithm at frequency 2
    memorised = 0.5 * wave(p, 1, a) - 0.3 * wave(p, 3, a, "sin") * wave(p, 1, b)  # other frequencies
    logits = 3.0 + circuit + memorised  # (p, p, p)
    keys = torch.tensor([2])
    assert torch.allclose(restricted_logits(logits, keys), 3.0 + circuit, atol=1e-4)
    assert torch.allclose(excluded_logits(logits, keys), 3.0 + memorised, atol=1e-4)


def test_restricted_logits_without_key_frequencies_leave_the_constant():
    p = 5
    a, b, c = grid(p)
    logits = 2.0 + wave(p, 1, a + b - c)
    assert torch.allclose(restricted_logits(logits, torch.tensor([], dtype=torch.long)), torch.full((p, p, p), 2.0), atol=1e-5)


def test_modular_sum_loss_of_a_perfect_and_a_uniform_model():
    p = 5
    a, b, c = grid(p)
    perfect = 50.0 * ((a + b) % p == c).float()  # (p, p, p)
    assert float(modular_sum_loss(perfect)) == pytest.approx(0.0, abs=1e-6)
    assert float(modular_sum_loss(torch.zeros(p, p, p + 1))) == pytest.approx(math.log(p + 1))
    pairs = torch.zeros(p, p, dtype=torch.bool)
    pairs[0, 1] = True  # only (0, 1), whose answer is 1
    wrong_there = perfect.clone()
    wrong_there[0, 1] = 0.0
    assert float(modular_sum_loss(wrong_there, pairs)) == pytest.approx(math.log(p))
    assert float(modular_sum_loss(wrong_there, ~pairs)) == pytest.approx(0.0, abs=1e-6)


def test_restricted_loss_of_the_fourier_algorithm_is_near_zero():
    """Logits of the clean algorithm, Σ_k cos(w_k(a+b−c)) over key frequencies, predict (a + b) mod p."""
    p = 13
    a, b, c = grid(p)
    algorithm = 10.0 * sum(wave(p, k, a + b - c) for k in (2, 5, 6))
    noise = 10.0 * torch.randn(p, p, p, generator=torch.Generator().manual_seed(0))
    logits = algorithm + noise
    keys = torch.tensor([2, 5, 6])
    assert float(modular_sum_loss(restricted_logits(logits, keys))) < 0.01 < float(modular_sum_loss(logits))
    assert float(modular_sum_loss(excluded_logits(logits, keys))) > math.log(p) - 0.5  # only noise left


def test_weight_norm_is_the_norm_of_all_parameters_together():
    assert float(weight_norm([torch.ones(2, 2), torch.tensor([3.0])])) == pytest.approx(math.sqrt(13))
