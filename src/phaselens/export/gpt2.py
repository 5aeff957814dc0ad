"""phaselens's own transformer as a Hugging Face GPT-2 (`GPT2LMHeadModel`) with the same forward.

The two are the same architecture: learned token and position embeddings, pre-LayerNorm blocks
(ln_1, attention with biases, ln_2, MLP), a final LayerNorm and an unembedding, attention scaled
by 1/sqrt(d_head), LayerNorm eps 1e-5. The weights map one to one, except for three differences:

* GPT-2 has no unembedding bias. phaselens's `b_U` is folded into the unembedding through the final
  LayerNorm: its output y = n * w + b has a normalised n with sum(n) = 0, so y . (1/w) = b . (1/w) = c
  for every input, and y @ W_U + b_U = y @ (W_U + (1/w) b_U^T / c). Exact in real arithmetic; it
  needs every w != 0 (else the export is refused). Training moves c through 0 (the induction demo's
  does, twice), so where c is small the fold first shifts the bias along w, b' = b + t w with
  t = sum|b / w| / d: y' = y + t w gives c' = c + t d, and y' @ W' = y @ W_U + b_U for
  W' = W_U + (1/w) (b_U - t w @ W_U)^T / c'. Logits, the logit lens (which also reads through
  ln_final) and the loss are unchanged. Read `W_U` (or, after a shift, ln_f's bias) alone and it differs.
* GPT-2 always has an MLP: an attention-only model gets one of width 1 whose output weights and
  bias are zero, so it adds exactly nothing.
* `normalization="none"` has no GPT-2 counterpart (its blocks always normalise): refused.

`verify_logits` checks the result on real tokens; the exporter refuses a checkpoint whose
logits differ by more than `LOGIT_TOLERANCE`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from phaselens.errors import ConfigError
from phaselens.models.config import ModelConfig

if TYPE_CHECKING:
    from phaselens.models.transformer import Transformer

LOGIT_TOLERANCE = 1e-4  # max |logit difference| allowed between the phaselens model and its GPT-2 export
MIN_FOLD = 1e-3  # where |c| is below this times sum(|b / w|), the b_U fold first shifts ln_final's bias


def gpt2_refusal(cfg: ModelConfig) -> str | None:
    """Why a phaselens transformer of this shape has no exact GPT-2 form (None: it has one)."""
    if cfg.normalization != "LN":
        return (f"model.normalization={cfg.normalization!r}: GPT-2 normalises before every attention, MLP and the "
                "unembedding, and a model without LayerNorms has no GPT-2 form")
    if cfg.d_head * cfg.n_heads != cfg.d_model:
        return (f"model.d_head={cfg.d_head} with {cfg.n_heads} heads is not d_model/n_heads ({cfg.d_model}): GPT-2 "
                "splits d_model evenly over its heads")
    return None


def gpt2_config(cfg: ModelConfig) -> Any:
    """The `GPT2Config` of a phaselens transformer shape (no dropout, untied unembedding)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                      n_head=cfg.n_heads, n_inner=cfg.d_mlp or 1, activation_function=cfg.act_fn,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _folded_unembedding(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`W_U` with `b_U` folded in through ln_final, and ln_final's bias (see the module docstring):
    (d_model, d_vocab), (d_model,)."""
    W_U, b_U = weights["W_U"].double(), weights["b_U"].double()  # (d, V), (V,)
    if not b_U.any():
        return weights["W_U"], weights["ln_final.b"]
    w, b = weights["ln_final.w"].double(), weights["ln_final.b"].double()  # (d,), (d,)
    if not w.ne(0).all():
        raise ConfigError("the final LayerNorm has a zero weight, so the unembedding bias b_U cannot be folded into "
                          "GPT-2's bias-free unembedding")
    inverse = 1.0 / w  # (d,)
    c = float(b @ inverse)  # y . (1/w) for every normalised input
    spread = float((b * inverse).abs().sum())
    shift = 0.0 if abs(c) >= MIN_FOLD * spread and c != 0.0 else (spread or 1.0) / len(w)
    c += shift * len(w)  # (b + shift·w) . (1/w)
    folded = W_U + torch.outer(inverse, b_U - shift * (w @ W_U)) / c  # (d, V)
    return folded.to(weights["W_U"].dtype), (b + shift * w).to(weights["ln_final.b"].dtype)


def gpt2_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict from a phaselens transformer's (`Transformer.state_dict()`)."""
    d, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def heads_in(W: torch.Tensor) -> torch.Tensor:  # (H, d, dh) -> (d, H*dh): Conv1D weights, heads side by side
        return W.permute(1, 0, 2).reshape(d, H * dh)

    W_U, ln_f_bias = _folded_unembedding(weights)  # (d, V), (d,)
    out = {"transformer.wte.weight": weights["W_E"], "transformer.wpe.weight": weights["W_pos"],
           "transformer.ln_f.weight": weights["ln_final.w"], "transformer.ln_f.bias": ln_f_bias,
           "lm_head.weight": W_U.T.contiguous()}  # (V, d)
    for l in range(cfg.n_layers):
        p, h = f"blocks.{l}.", f"transformer.h.{l}."
        attn = {k: weights[p + "attn." + k] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
        out |= {
            h + "ln_1.weight": weights[p + "ln1.w"], h + "ln_1.bias": weights[p + "ln1.b"],
            h + "attn.c_attn.weight": torch.cat([heads_in(attn[k]) for k in ("W_Q", "W_K", "W_V")], 1),  # (d, 3*H*dh)
            h + "attn.c_attn.bias": torch.cat([attn[k].reshape(H * dh) for k in ("b_Q", "b_K", "b_V")]),
            h + "attn.c_proj.weight": attn["W_O"].reshape(H * dh, d), h + "attn.c_proj.bias": attn["b_O"],
        }
        if cfg.d_mlp:
            out |= {h + "ln_2.weight": weights[p + "ln2.w"], h + "ln_2.bias": weights[p + "ln2.b"],
                    h + "mlp.c_fc.weight": weights[p + "mlp.W_in"], h + "mlp.c_fc.bias": weights[p + "mlp.b_in"],
                    h + "mlp.c_proj.weight": weights[p + "mlp.W_out"], h + "mlp.c_proj.bias": weights[p + "mlp.b_out"]}
        else:  # a width-1 MLP that adds exactly zero
            like = weights["W_E"]
            out |= {h + "ln_2.weight": like.new_ones(d), h + "ln_2.bias": like.new_zeros(d),
                    h + "mlp.c_fc.weight": like.new_zeros(d, 1), h + "mlp.c_fc.bias": like.new_zeros(1),
                    h + "mlp.c_proj.weight": like.new_zeros(1, d), h + "mlp.c_proj.bias": like.new_zeros(d)}
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def to_gpt2(model: Transformer) -> Any:
    """A `GPT2LMHeadModel` (eval mode, float32) computing the same logits as the phaselens `Transformer` `model`."""
    from transformers import GPT2LMHeadModel

    cfg = model.cfg
    reason = gpt2_refusal(cfg)
    if reason:
        raise ConfigError(f"this run's transformer has no exact GPT-2 form: {reason}")
    hf = GPT2LMHeadModel(gpt2_config(cfg))
    state = gpt2_state_dict(cfg, {k: v.float() for k, v in model.state_dict().items()})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # the causal-mask buffers GPT-2 builds itself are the only keys the map may leave out
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ConfigError(f"the GPT-2 weight map is incomplete (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return hf.eval()


def verify_logits(model: Transformer, hf: Any, tokens: torch.Tensor) -> float:
    """The largest |logit difference| between the phaselens model and its GPT-2 form on `tokens` (B, T)."""
    with torch.no_grad():
        ours = model(tokens).float()  # (B, T, V)
        theirs = hf(input_ids=tokens).logits.float()  # (B, T, V)
    return float((ours - theirs).abs().max())
