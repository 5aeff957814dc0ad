"""Load BDH checkpoints saved with `torch.save` (the authors' training code and its forks).

The file must hold a dict with a state_dict (under "model", "state_dict" or "model_state_dict",
or the file is the state_dict itself) and, optionally, the config as a plain dict under
"config" / "model_config" / "model_args" (the reference names n_layer, n_embd, n_head,
mlp_internal_dim_multiplier, vocab_size, dropout, or ours). Shapes missing from the config
are read off the weights. It is loaded with `weights_only=True`: no pickled code ever runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from phaselens.errors import CheckpointError
from phaselens.models.bdh import BDH
from phaselens.models.bdh_config import BDHConfig
from phaselens.models.checkpoints import state_dict_problems

STATE_KEYS = ("model", "state_dict", "model_state_dict")
CONFIG_KEYS = ("config", "model_config", "model_args")
COMPILE_PREFIX = "_orig_mod."
DERIVED = ("attn.freqs",)  # RoPE frequencies: a buffer in the reference code, recomputed here
REFERENCE_NAMES = {"n_layer": "n_layers", "n_embd": "d_model", "n_head": "n_heads",
                   "mlp_internal_dim_multiplier": "multiplier", "vocab_size": "d_vocab", "block_size": "n_ctx"}


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict with any `_orig_mod.` prefix stripped, config dict) from a .pt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a PyTorch checkpoint")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        if not found:
            reason = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path} is not a readable PyTorch file (corrupt or truncated?): {reason}") from exc
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, which are not loaded (weights_only=True): "
            f"{found}. Save the config as a dict, e.g. "
            "torch.save({'model': model.state_dict(), 'config': dataclasses.asdict(config)}, path)"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:  # what torch.load raises on other files
        raise CheckpointError(f"{path} is not a readable PyTorch file (corrupt, truncated, or not a checkpoint at all): "
                              f"{str(exc) or type(exc).__name__}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}; expected a dict with a state_dict and a config")
    state = next((raw[k] for k in STATE_KEYS if isinstance(raw.get(k), dict)), None)
    if state is None:
        if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            state = raw
        else:
            raise CheckpointError(f"{path} has no state_dict: expected one of the keys {STATE_KEYS}, found {sorted(raw)}")
    config = next((raw[k] for k in CONFIG_KEYS if isinstance(raw.get(k), dict)), {})
    state = {k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k: v for k, v in state.items()}
    return state, dict(config)


def config_from(state: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> BDHConfig:
    """A BDHConfig from the saved config (either naming), shapes read off the weights where it is silent."""
    values = {REFERENCE_NAMES.get(k, k): v for k, v in config.items()}
    known = {"n_layers", "d_model", "n_heads", "multiplier", "d_vocab", "n_ctx", "dropout"}
    values = {k: v for k, v in values.items() if k in known}
    encoder = state.get("encoder")
    if isinstance(encoder, torch.Tensor) and encoder.dim() == 3:
        nh, D, N = encoder.shape
        values.setdefault("n_heads", int(nh))
        values.setdefault("d_model", int(D))
        values.setdefault("multiplier", int(N * nh // D) if D else 0)
    embed = state.get("embed.weight")
    if isinstance(embed, torch.Tensor) and embed.dim() == 2:
        values.setdefault("d_vocab", int(embed.shape[0]))
    try:
        cfg = BDHConfig(**values)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config does not describe a BDH model ({exc})") from exc
    return cfg


def load_bdh_checkpoint(path: Path | str, device: str | torch.device | None = None) -> BDH:
    """A BDH model with the weights of a `torch.save`d checkpoint (evaluation mode)."""
    path = Path(path)
    state, config = read_checkpoint(path)
    cfg = config_from(state, config, path)
    model = BDH(cfg)
    state = {k: v for k, v in state.items() if k not in DERIVED}
    problems = state_dict_problems(model, state)
    if problems:
        raise CheckpointError(f"{path} does not match a BDH model with {cfg}: {problems}")
    model.load_state_dict(state)
    model.eval()
    return model.to(device) if device else model
