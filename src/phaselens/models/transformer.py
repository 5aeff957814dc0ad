"""A small decoder-only transformer with TransformerLens hook points.

Every activation a probe may want sits behind a `HookPoint` with the name TransformerLens
uses, so `run_with_cache`, `run_with_hooks` and our own live telemetry address the same
tensors. Weights have TransformerLens shapes (`W_Q`: head d_model d_head, `W_U`: d_model vocab)
so QK/OV circuits can be read off directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from phaselens.models.config import ModelConfig


class LayerNorm(nn.Module):
    """LayerNorm that exposes its scale and normalized output as hook points."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # (B, T, 1)
        self.hook_normalized = HookPoint()  # (B, T, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)  # (B, T, d_model)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())  # (B, T, 1)
        return self.hook_normalized(x / scale) * self.w + self.b


class Identity(nn.Module):
    """Stands in for a norm when the model has none, keeping `ln_final.hook_normalized`."""

    def __init__(self):
        super().__init__()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return LayerNorm(cfg.d_model) if cfg.normalization == "LN" else Identity()


class Attention(nn.Module):
    """Causal multi-head attention with one hook point per intermediate tensor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(H, d, dh))
        self.W_K = nn.Parameter(torch.empty(H, d, dh))
        self.W_V = nn.Parameter(torch.empty(H, d, dh))
        self.W_O = nn.Parameter(torch.empty(H, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(H, dh))
        self.b_K = nn.Parameter(torch.zeros(H, dh))
        self.b_V = nn.Parameter(torch.zeros(H, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.register_buffer(
            "mask", torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool).tril(), persistent=False
        )
        self.scale = 1.0 / math.sqrt(dh)
        self.hook_q = HookPoint()  # (B, T, H, dh)
        self.hook_k = HookPoint()  # (B, T, H, dh)
        self.hook_v = HookPoint()  # (B, T, H, dh)
        self.hook_attn_scores = HookPoint()  # (B, H, Tq, Tk)
        self.hook_pattern = HookPoint()  # (B, H, Tq, Tk)
        self.hook_z = HookPoint()  # (B, T, H, dh)
        self.hook_result = HookPoint()  # (B, T, H, d_model); only computed when hooked

    def _fused_ok(self) -> bool:
        """Use the fused kernel only when nobody reads scores or pattern, and only without autograd:
        training always takes the explicit path, so its numbers never depend on telemetry settings."""
        return not (torch.is_grad_enabled() or self.hook_attn_scores._forward_hooks or self.hook_pattern._forward_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        H, dh = self.W_Q.shape[0], self.W_Q.shape[2]
        # One fused matmul for q, k, v keeps training close to plain-PyTorch speed.
        w_qkv = torch.cat([self.W_Q, self.W_K, self.W_V], 0).permute(1, 0, 2).reshape(d, 3 * H * dh)
        b_qkv = torch.cat([self.b_Q, self.b_K, self.b_V], 0).reshape(3 * H * dh)
        q, k, v = (x @ w_qkv + b_qkv).view(B, T, 3, H, dh).unbind(2)  # each (B, T, H, dh)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self._fused_ok():
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
        else:
            scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.scale  # (B, H, T, T)
            scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(scores.softmax(-1))  # (B, H, T, T)
            z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))  # (B, T, H, dh)
        if self.hook_result._forward_hooks:
            # Per-head outputs cost an extra (B, T, H, d_model) tensor: only when asked for.
            result = self.hook_result(torch.einsum("bqhe,hed->bqhd", z, self.W_O))
            return result.sum(2) + self.b_O
        return z.reshape(B, T, H * dh) @ self.W_O.reshape(H * dh, d) + self.b_O  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = {"gelu": F.gelu, "relu": F.relu}[cfg.act_fn]
        self.hook_pre = HookPoint()  # (B, T, d_mlp)
        self.hook_post = HookPoint()  # (B, T, d_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(x @ self.W_in + self.b_in)  # (B, T, d_mlp)
        post = self.hook_post(self.act(pre))  # (B, T, d_mlp)
        return post @ self.W_out + self.b_out  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.has_mlp = cfg.d_mlp > 0
        if self.has_mlp:
            self.ln2 = make_norm(cfg)
            self.mlp = MLP(cfg)
            self.hook_resid_mid = HookPoint()  # (B, T, d_model)
            self.hook_mlp_out = HookPoint()  # (B, T, d_model)
        self.hook_resid_pre = HookPoint()  # (B, T, d_model)
        self.hook_attn_out = HookPoint()  # (B, T, d_model)
        self.hook_resid_post = HookPoint()  # (B, T, d_model)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        resid = resid + self.hook_attn_out(self.attn(self.ln1(resid)))
        if self.has_mlp:
            resid = self.hook_resid_mid(resid)
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)


class Transformer(HookedRootModule):
    """Decoder-only transformer; `forward(tokens)` returns logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.hook_embed = HookPoint()  # (B, T, d_model)
        self.hook_pos_embed = HookPoint()  # (B, T, d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        self.init_weights()
        self.setup()

    def init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.split(".")[-1].startswith("W_"):
                nn.init.normal_(p, std=self.cfg.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the model's context n_ctx={self.cfg.n_ctx}")
        embed = self.hook_embed(self.W_E[tokens])  # (B, T, d_model)
        pos = self.hook_pos_embed(self.W_pos[:T]).expand(B, T, -1)  # (B, T, d_model)
        resid = embed + pos
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(self.ln_final(resid))

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a (normalised) residual stream: (..., d_model) -> (..., vocab)."""
        return resid @ self.W_U + self.b_U

    @property
    def device(self) -> torch.device:
        return self.W_E.device
