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
        if not (torch.is_grad_enabled() or self.hook_scale._forward_hooks or self.hook_normalized._forward_hooks):
            # The fused kernel when nothing reads the intermediates and nothing trains (as in Attention).
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
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
        future = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool).triu(1)
        self.register_buffer("causal_bias", torch.zeros(cfg.n_ctx, cfg.n_ctx).masked_fill(future, float("-inf")), persistent=False)
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
            # Batched matmuls over (batch·head) with the causal mask added in the same kernel:
            # about twice as fast as einsum + masked_fill on CPU, with the same numbers.
            qh, kh, vh = (t.transpose(1, 2).reshape(B * H, T, dh) for t in (q, k, v))
            scores = torch.baddbmm(self.causal_bias[:T, :T], qh, kh.transpose(1, 2), alpha=self.scale)
            scores = self.hook_attn_scores(scores.view(B, H, T, T))  # -inf above the diagonal
            pattern = self.hook_pattern(scores.softmax(-1))  # (B, H, T, T)
            z = torch.bmm(pattern.reshape(B * H, T, T), vh).view(B, H, T, dh)
            z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
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
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds the model's context n_ctx={self.cfg.n_ctx}")
        return self.forward_from(self.embed(tokens), 0)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0: token plus position embeddings, (B, T, d_model)."""
        B, T = tokens.shape
        embed = self.hook_embed(self.W_E[tokens])  # (B, T, d_model)
        pos = self.hook_pos_embed(self.W_pos[:T]).expand(B, T, -1)  # (B, T, d_model)
        return embed + pos

    def residual_streams(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The stream entering each block, then the last block's output: n_layers + 1 tensors (B, T, d_model).

        The same tensors as `run_with_cache` gives for `blocks.{l}.hook_resid_pre` and the last
        `hook_resid_post`, without the cache's bookkeeping and without unembedding.
        """
        streams = [self.embed(tokens)]
        for block in self.blocks:
            streams.append(block(streams[-1]))
        return streams

    def forward_from(self, resid: torch.Tensor, layer: int, at: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Logits from the residual stream entering block `layer` (`n_layers`: the last block's output).

        Activation patching uses it to re-run only the blocks above a patched stream. `at`, an index
        into the (B, T) positions such as `mask.nonzero(as_tuple=True)`, unembeds only those: (N, vocab).
        """
        for block in self.blocks[layer:]:
            resid = block(resid)
        if at is not None:
            resid = resid[at]
        return self.unembed(self.ln_final(resid))

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a (normalised) residual stream: (..., d_model) -> (..., vocab)."""
        return resid @ self.W_U + self.b_U

    @property
    def device(self) -> torch.device:
        return self.W_E.device
