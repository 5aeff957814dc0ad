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

    def _project(self, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
        """x (..., d_model) through several (H, d_model, d_head) projections in one matmul: (..., n, H, d_head)."""
        H, d, dh = self.W_Q.shape
        w = torch.cat(weights, 0).permute(1, 0, 2).reshape(d, len(weights) * H * dh)
        b = torch.cat(biases, 0).reshape(len(weights) * H * dh)
        return torch.addmm(b, x.reshape(-1, d), w).view(*x.shape[:-1], len(weights), H, dh)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values: (B, T, d_model) -> each (B, T, H, d_head)."""
        # One fused matmul for q, k, v keeps training close to plain-PyTorch speed.
        q, k, v = self._project(x, [self.W_Q, self.W_K, self.W_V], [self.b_Q, self.b_K, self.b_V]).unbind(-3)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def _out(self, z: torch.Tensor) -> torch.Tensor:
        """The attention output from the heads' mixed values: (..., H, d_head) -> (..., d_model)."""
        H, dh, d = self.W_O.shape
        return torch.addmm(self.b_O, z.reshape(-1, H * dh), self.W_O.reshape(H * dh, d)).view(*z.shape[:-2], d)

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The output at positions (rows, cols) only, every position still a key: (N, d_model).

        Queries are gathered per sequence into a padded (B, S) grid, S the most positions any one
        sequence asks for, so attention costs S/T of the full computation. No hook point fires:
        the caller makes sure none is hooked (`Block.forward_at`).
        """
        B, T, _ = x.shape
        k, v = self._project(x, [self.W_K, self.W_V], [self.b_K, self.b_V]).unbind(-3)  # each (B, T, H, dh)
        slot, width = _slots(rows, B)
        index = cols.new_zeros(B, width)
        index[rows, slot] = cols  # padding slots query position 0, and are dropped below
        picked = self._project(x[torch.arange(B, device=x.device)[:, None], index], [self.W_Q], [self.b_Q])[..., 0, :, :]  # (B, S, H, dh)
        allowed = torch.arange(T, device=x.device) <= index[..., None]  # (B, S, T): causal, per query
        z = F.scaled_dot_product_attention(picked.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None])
        return self._out(z.transpose(1, 2)[rows, slot])  # (N, d)

    def _qkv_split(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values from one normalised input per head and kind: each (B, T, H, d_model) -> (B, T, H, d_head)."""
        q = torch.einsum("bthd,hde->bthe", xq, self.W_Q) + self.b_Q
        k = torch.einsum("bthd,hde->bthe", xk, self.W_K) + self.b_K
        v = torch.einsum("bthd,hde->bthe", xv, self.W_V) + self.b_V
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def forward(self, x: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, d_model) normalised; or `split`, one normalised input per head for q, k and v (each (B, T, H, d_model))."""
        B, T, _ = x.shape
        H, dh = self.W_Q.shape[0], self.W_Q.shape[2]
        q, k, v = self._qkv(x) if split is None else self._qkv_split(*split)
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
        return self._out(z)  # (B, T, d)


def _slots(rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """Each entry's place among the entries of its row, and the most entries in one row: ((N,), S)."""
    counts = torch.bincount(rows, minlength=n_rows)  # (B,)
    order = torch.argsort(rows, stable=True)
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows[order]]
    return slot, int(counts.max()) if len(rows) else 0


def _hooked(module: nn.Module) -> bool:
    """Whether a hook point inside `module` has a hook (a partial evaluation would hand it partial tensors)."""
    return any(m._forward_hooks for m in module.modules() if isinstance(m, HookPoint))


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
            self.hook_mlp_in = HookPoint()  # (B, T, d_model): the MLP's own copy of the stream, before ln2
        self.hook_resid_pre = HookPoint()  # (B, T, d_model)
        # One copy of the stream per head for its queries, keys and values, before ln1 (as TransformerLens's
        # use_split_qkv_input): only built when hooked, so that an edge into one head's k can be patched alone.
        self.hook_q_input = HookPoint()  # (B, T, H, d_model)
        self.hook_k_input = HookPoint()  # (B, T, H, d_model)
        self.hook_v_input = HookPoint()  # (B, T, H, d_model)
        self.hook_attn_out = HookPoint()  # (B, T, d_model)
        self.hook_resid_post = HookPoint()  # (B, T, d_model)

    def _split_inputs(self, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per-head normalised q, k, v inputs (B, T, H, d_model) each, when a split-input hook point is hooked; else None."""
        points = (self.hook_q_input, self.hook_k_input, self.hook_v_input)
        if not any(point._forward_hooks or point._backward_hooks for point in points):
            return None
        B, T, d = resid.shape
        H = self.attn.W_Q.shape[0]
        return tuple(self.ln1(point(resid[:, :, None, :].expand(B, T, H, d).clone())) for point in points)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        split = self._split_inputs(resid)
        resid = resid + self.hook_attn_out(self.attn(self.ln1(resid)) if split is None else self.attn(resid, split))
        if self.has_mlp:
            resid = self.hook_resid_mid(resid)
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(self.hook_mlp_in(resid))))
        return self.hook_resid_post(resid)

    def forward_at(self, resid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The block's output at positions (rows, cols) only: (B, T, d_model) -> (N, d_model).

        What `forward(resid)[rows, cols]` gives, computing queries, output and MLP only where
        asked; with a hook anywhere in the block it runs the whole block, so the hook sees it all.
        """
        if _hooked(self):
            return self(resid)[rows, cols]
        out = resid[rows, cols] + self.attn.forward_at(self.ln1(resid), rows, cols)  # (N, d)
        if self.has_mlp:
            out = out + self.mlp(self.ln2(out))
        return out


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

    def residual_streams(self, tokens: torch.Tensor, n_blocks: int | None = None) -> list[torch.Tensor]:
        """The stream entering each block, then the last block's output: n_layers + 1 tensors (B, T, d_model).

        The same tensors as `run_with_cache` gives for `blocks.{l}.hook_resid_pre` and the last
        `hook_resid_post`, without the cache's bookkeeping and without unembedding. With `n_blocks`,
        only the first that many blocks run: n_blocks + 1 tensors.
        """
        streams = [self.embed(tokens)]
        for block in self.blocks[:n_blocks]:
            streams.append(block(streams[-1]))
        return streams

    def stream_from(self, resid: torch.Tensor, layer: int, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The last block's output from the residual stream entering block `layer`: (B, T, d_model).

        `at`, (rows, cols) such as `mask.nonzero(as_tuple=True)`, asks for those positions only:
        (N, d_model). Nothing after the last block mixes positions, so it computes only those.
        """
        blocks = self.blocks[layer:]
        if at is None:
            for block in blocks:
                resid = block(resid)
            return resid
        for block in blocks[:-1]:
            resid = block(resid)
        return blocks[-1].forward_at(resid, *at) if len(blocks) else resid[at]

    def forward_from(self, resid: torch.Tensor, layer: int, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits from the residual stream entering block `layer` (`n_layers`: the last block's output).

        Activation patching uses it to re-run only the blocks above a patched stream; with `at`
        (see `stream_from`) only those positions' logits: (N, vocab).
        """
        return self.unembed(self.ln_final(self.stream_from(resid, layer, at)))

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a (normalised) residual stream: (..., d_model) -> (..., vocab)."""
        return torch.addmm(self.b_U, resid.reshape(-1, resid.shape[-1]), self.W_U).view(*resid.shape[:-1], self.W_U.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.W_E.device
