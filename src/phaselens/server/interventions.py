"""What the model view computes: per-token loss, attention, ablation, freezing, patching, gradients.

Every function takes a model adapter (`phaselens.models.adapter`) and token ids, and learns hook
names, dimensions and weights from it alone, so any adapter model works: a phaselens transformer,
a `TransformerBridge`. Hooks are registered on the model's `HookPoint`s for the length of one call
and removed by their own handles, so hooks a user added in a notebook stay in place and run too
(TransformerLens' `run_with_hooks` would reset them). The hooks and the ablation itself live in
`phaselens.probes.ablation`, shared with the reports that rank components by ablation.
"""

from __future__ import annotations

import torch

from phaselens.models.adapter import HeadWeights, ModelAdapter
from phaselens.probes.ablation import copy_positions, per_head, run_caching, temporary_hooks
from phaselens.probes.loss import masked_mean, token_losses


TOP_K_TOKENS = 40  # tokens a head's circuits are shown on when the vocabulary is too large to show whole
TOKEN_SPACE_MAX_VOCAB = 256


def loss_view(logits: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per-position loss of one sequence, its mean, and its mean on the copy positions."""
    losses = token_losses(logits, tokens[None])[0]  # (T-1,)
    copies = copy_positions(tokens)
    copy_loss = float(masked_mean(losses, copies)) if bool(copies.any()) else None
    return {"loss": losses.tolist(), "copy_positions": copies.tolist(), "mean_loss": float(losses.mean()), "copy_loss": copy_loss}


def attention_pattern(model: ModelAdapter, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """One head's attention on one sequence: (T,) -> (Tq, Tk)."""
    name = model.pattern_hook(layer)
    with torch.no_grad():
        _, cache = run_caching(model, tokens[None], [name])
    return cache[name][0, head]


def logit_diff(logits: torch.Tensor, answer: int, wrong: int) -> float:
    """logit(answer) − logit(wrong) at the last position of one sequence: logits (1, T, V)."""
    last = logits[0, -1].float()
    return float(last[answer] - last[wrong])


def patch_logit_diff(model: ModelAdapter, clean: torch.Tensor, corrupted: torch.Tensor, hook_name: str,
                     head: int | None, position: int | None, answer: int | None, wrong: int | None) -> dict:
    """Run the corrupted prompt with one node taken from the clean run; logit differences at the last position."""
    with torch.no_grad():
        clean_logits, cache = run_caching(model, clean[None], [hook_name])
        corrupted_logits = model.logits(corrupted[None])
        answer = int(clean_logits[0, -1].argmax()) if answer is None else answer
        if wrong is None:  # the corrupted run's favourite, or the clean run's runner-up when they agree
            ranked = corrupted_logits[0, -1].argsort(descending=True).tolist()
            wrong = ranked[0] if ranked[0] != answer else clean_logits[0, -1].argsort(descending=True)[1].item()
        source = cache[hook_name]

        def patch(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            rows = slice(None) if position is None else slice(position, position + 1)
            if head is None:
                x[:, rows] = source[:, rows]
            else:
                per_head(x, model.n_heads)[:, rows, head] = per_head(source, model.n_heads)[:, rows, head]
            return x

        with temporary_hooks(model, [(hook_name, patch)]):
            patched_logits = model.logits(corrupted[None])
    diffs = [logit_diff(lg, answer, wrong) for lg in (clean_logits, corrupted_logits, patched_logits)]
    span = diffs[0] - diffs[1]
    return {
        "hook_name": hook_name, "answer": answer, "wrong": wrong,
        "clean_logit_diff": diffs[0], "corrupted_logit_diff": diffs[1], "patched_logit_diff": diffs[2],
        "recovered": (diffs[2] - diffs[1]) / span if abs(span) > 1e-6 else None,
    }


def embedding_gradients(model: ModelAdapter, tokens: torch.Tensor, position: int | None) -> tuple[torch.Tensor, float]:
    """‖∂loss/∂embedding_t‖ per token (T,), for the mean loss or the loss of one prediction."""
    captured: dict[str, torch.Tensor] = {}

    def track(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        captured["embed"] = x
        return x

    with torch.enable_grad(), temporary_hooks(model, [(model.embed_hook, track)]):
        logits = model.logits(tokens[None])
        losses = token_losses(logits, tokens[None])[0]  # (T-1,)
        loss = losses.mean() if position is None else losses[position]
        (grad,) = torch.autograd.grad(loss, captured["embed"])
    return grad[0].norm(dim=-1), float(loss.detach())  # (T,)


def ordinary_tokens(model: ModelAdapter, d_vocab: int) -> torch.Tensor:
    """(d_vocab,) bool: ids that stand for text, i.e. neither special nor the padding past a Hugging Face tokenizer's end."""
    ordinary = torch.zeros(d_vocab, dtype=torch.bool)
    ordinary[[i for i in model.tokenizer.ordinary_ids() if i < d_vocab]] = True
    return ordinary


def circuit_matrices(model: ModelAdapter, layer: int, head: int, weights: HeadWeights | None) -> dict:
    """A head's QK and OV circuits in token space: the whole vocabulary when it is small, else its top-k tokens.

    QK = (W_E W_Q)(W_E W_K)ᵀ (query token × key token), OV = W_E W_V W_O W_U (attended token ×
    promoted logit). Past `TOKEN_SPACE_MAX_VOCAB` tokens they are shown on the `TOP_K_TOKENS`
    ordinary tokens (no special or padding ids) whose embedding the head's OV circuit moves most,
    ‖W_E[t] W_V W_O‖, on both axes. A model without per-head weights (`weights` None) gets a reason instead.
    """
    if weights is None:
        return {"space": "hidden", "ids": [], "qk": None, "ov": None,
                "note": f"{model.architecture} has no per-head query, key, value and output weights to form circuits from"}
    W_Q, W_K, W_V, W_O = (w[layer, head].detach().float() for w in (weights.W_Q, weights.W_K, weights.W_V, weights.W_O))  # (d, dh) x3, (dh, d)
    with torch.no_grad():
        W_E, W_U = model.embedding().detach().float(), model.unembedding().detach().float()  # (V, d), (d, V)
        if W_E.shape[0] <= TOKEN_SPACE_MAX_VOCAB:
            ids = torch.arange(W_E.shape[0], device=W_E.device)
            note = f"all {W_E.shape[0]} tokens"
        else:
            moved = (W_E @ W_V @ W_O).norm(dim=-1)  # (V,): how much the head moves each token's embedding
            ordinary = ordinary_tokens(model, W_E.shape[0]).to(moved.device)
            ids = moved.masked_fill(~ordinary, -1.0).topk(min(TOP_K_TOKENS, int(ordinary.sum()))).indices.sort().values
            note = f"the {len(ids)} of {W_E.shape[0]} tokens this head's OV circuit moves most (‖W_E W_V W_O‖)"
        E = W_E[ids]  # (k, d)
        qk = (E @ W_Q) @ (E @ W_K).T  # (k, k): query token x key token
        ov = E @ W_V @ W_O @ W_U[:, ids]  # (k, k): attended token x promoted logit
    return {"space": "token" if len(ids) == W_E.shape[0] else "top_k", "ids": ids.tolist(), "qk": qk, "ov": ov, "note": note}
