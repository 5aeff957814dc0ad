"""A lower bound on the memory one training step needs, checked before anything is built.

An impossible shape (`model.n_ctx=1000000`) would otherwise end minutes later in a raw allocation
error, or take the machine down with it. The bound counts only what cannot be avoided:

    weights, gradients and AdamW's two moments      4 · P · 4 bytes
    attention scores and patterns kept for backward  2 · B · L · H · T² · 4 bytes
    logits and their gradient                        2 · B · T · V · 4 bytes

with B the training batch, or the probe or eval batch when one of those (measured without
gradients, so counted once) is larger.
"""

from __future__ import annotations

import os

from phaselens.errors import ConfigError

FLOAT_BYTES = 4


def step_memory_bytes(config) -> int:
    """At least this many bytes are live during one training step of `config` (a RunConfig)."""
    m, d, t = config.model, config.data, config.train
    rows = max(2 * t.batch_size, getattr(d, "probe_size", 0), getattr(d, "eval_size", 0))  # (B, T) arrays with a gradient count twice
    n_ctx, vocab = int(m.n_ctx), int(m.d_vocab)
    layers, heads, width = int(getattr(m, "n_layers", 1)), int(getattr(m, "n_heads", 1)), int(getattr(m, "d_model", 0))
    params = vocab * width * 2 + layers * 4 * width * width  # embeddings, unembedding, attention projections
    attention = rows * layers * heads * n_ctx * n_ctx  # (B, H, T, T) per layer
    logits = rows * n_ctx * vocab  # (B, T, V)
    return FLOAT_BYTES * (4 * params + attention + logits)


def device_memory_bytes(device) -> int | None:
    """Physical memory of `device` (a torch.device): the GPU's, or this machine's RAM; None when unknown."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config, device) -> None:
    """Refuse (ConfigError, with the estimate) a config whose training step cannot fit on `device`."""
    need, have = step_memory_bytes(config), device_memory_bytes(device)
    if have is not None and need > have:
        m = config.model
        raise ConfigError(
            f"one training step needs at least {_gib(need)} (model.n_ctx={m.n_ctx}, train.batch_size={config.train.batch_size}), "
            f"but {device} has {_gib(have)} in all; lower model.n_ctx or train.batch_size")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
