"""BDH ("Baby Dragon Hatchling") with phaselens hook points.

One set of weights is applied `n_layers` times. Each pass lifts the D-dimensional state into
n_heads·N positive (ReLU) neurons, runs a linear, strictly causal attention over them (RoPE on
queries = keys, no softmax, no scaling), gates a second sparse code with the first, and folds
the product back into D dimensions. Parameters are shared across layers, hook points are not:
`blocks.{l}.hook_xy_sparse` is the product code of pass l.

Parameter names follow the authors' reference implementation (`encoder`, `encoder_v`,
`decoder`, `embed.weight`, `lm_head`), so their checkpoints load (see `bdh_checkpoint`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from phaselens.models.bdh_config import BDHConfig

ROPE_THETA = 2.0**16


def rope_frequencies(n: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """Turns per position of each of the n dimensions: θ^(−2⌊k/2⌋/n) / 2π, pairs sharing one frequency."""
    k = torch.arange(n, dtype=torch.float32)
    return theta ** (-(torch.div(k, 2, rounding_mode="floor") * 2) / n) / (2 * math.pi)  # (n,)


def rope(v: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of v's last dimension by 2π·(t·freq mod 1): v (..., T, n) -> (..., T, n).

    Equal to v·cos + v_rot·sin with v_rot the pairs (−v_odd, v_even) interleaved; computed as one
    complex product per pair (even = real part, odd = imaginary part), which is much faster.
    """
    T = v.shape[-2]
    t = torch.arange(T, device=v.device, dtype=freqs.dtype)[:, None]  # (T, 1)
    # Taking the fraction before multiplying by 2π keeps the angle exact at large t.
    phases = torch.remainder(t * freqs[0::2], 1.0) * (2 * math.pi)  # (T, n/2): a pair shares its frequency
    turn = torch.polar(torch.ones_like(phases), phases)  # (T, n/2) complex
    pairs = torch.view_as_complex(v.float().unflatten(-1, (-1, 2)).contiguous())  # (..., T, n/2)
    return torch.view_as_real(pairs * turn).flatten(-2).to(v.dtype)


class LinearAttention(nn.Module):
    """Strictly causal linear attention with Q = K: (Q_r Q_rᵀ masked to earlier keys) @ V."""

    def __init__(self, cfg: BDHConfig):
        super().__init__()
        # Not persistent: derived from N, so it is never a checkpoint's business.
        self.register_buffer("freqs", rope_frequencies(cfg.n_neurons), persistent=False)

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, nh, T, N), v (B, 1, T, D) -> (B, nh, T, D)."""
        qr = rope(q, self.freqs)  # (B, nh, T, N)
        scores = (qr @ qr.transpose(-1, -2)).tril(diagonal=-1)  # (B, nh, T, T): keys strictly before the query
        return scores @ v  # (B, nh, T, D)


class BDHLayerHooks(nn.Module):
    """The hook points of one pass (the weights themselves are shared by all passes)."""

    def __init__(self):
        super().__init__()
        self.hook_x_sparse = HookPoint()  # (B, nh, T, N)
        self.hook_attn_out = HookPoint()  # (B, nh, T, D)
        self.hook_y_sparse = HookPoint()  # (B, nh, T, N)
        self.hook_xy_sparse = HookPoint()  # (B, nh, T, N), before dropout
        self.hook_resid_post = HookPoint()  # (B, T, D)


class BDH(HookedRootModule):
    """BDH language model; `forward(tokens)` returns logits (B, T, vocab)."""

    def __init__(self, cfg: BDHConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        nh, D, N = cfg.n_heads, cfg.d_model, cfg.n_neurons
        self.encoder = nn.Parameter(torch.empty(nh, D, N))
        self.encoder_v = nn.Parameter(torch.empty(nh, D, N))
        self.decoder = nn.Parameter(torch.empty(nh * N, D))
        self.embed = nn.Embedding(cfg.d_vocab, D)
        self.lm_head = nn.Parameter(torch.empty(D, cfg.d_vocab))
        self.attn = LinearAttention(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_embed = HookPoint()  # (B, T, D), before the first LayerNorm
        self.blocks = nn.ModuleList(BDHLayerHooks() for _ in range(cfg.n_layers))
        for p in (self.encoder, self.encoder_v, self.decoder, self.embed.weight, self.lm_head):
            nn.init.normal_(p, std=0.02)
        self.setup()

    def ln(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm over D without affine parameters."""
        return F.layer_norm(x, x.shape[-1:])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the model's context n_ctx={self.cfg.n_ctx}")
        nh, N, D = self.cfg.n_heads, self.cfg.n_neurons, self.cfg.d_model
        x = self.ln(self.hook_embed(self.embed(tokens))).unsqueeze(1)  # (B, 1, T, D)
        for hooks in self.blocks:
            x_sparse = hooks.hook_x_sparse(F.relu(x @ self.encoder))  # (B, nh, T, N)
            a = hooks.hook_attn_out(self.attn(x_sparse, x))  # (B, nh, T, D)
            y_sparse = hooks.hook_y_sparse(F.relu(self.ln(a) @ self.encoder_v))  # (B, nh, T, N)
            xy_sparse = self.drop(hooks.hook_xy_sparse(x_sparse * y_sparse))  # (B, nh, T, N)
            y_mlp = xy_sparse.transpose(1, 2).reshape(B, 1, T, nh * N) @ self.decoder  # (B, 1, T, D)
            x = self.ln(x + self.ln(y_mlp))  # (B, 1, T, D)
            x = hooks.hook_resid_post(x.view(B, T, D)).view(B, 1, T, D)
        return x.view(B, T, D) @ self.lm_head  # (B, T, vocab)

    @property
    def device(self) -> torch.device:
        return self.encoder.device
