"""Boot Hugging Face revisions through TransformerLens's `TransformerBridge`, one at a time.

An imported series' checkpoint directories hold only `reference.json` (the source and the
revision); loading one boots that revision with the standard hook names
(`blocks.{l}.hook_resid_post`, `blocks.{l}.attn.hook_pattern`, `ln_final.hook_normalized`, ...),
so probes read it exactly like a phaselens model. Nothing is cached: free the bridge after use
and memory stays flat over a long series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phaselens.errors import CheckpointError

REFERENCE_FILE = "reference.json"


def is_reference(checkpoint: Path) -> bool:
    return (Path(checkpoint) / REFERENCE_FILE).is_file()


def read_reference(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / REFERENCE_FILE
    try:
        ref = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is missing or corrupt ({exc})") from exc
    if not isinstance(ref, dict) or not ref.get("source") or not ref.get("revision"):
        raise CheckpointError(f"{path} must name a source and a revision")
    return ref


def boot_revision(source: str, revision: str, local: bool, device: Any = None, dtype: Any = None, hf_model: Any = None):
    """A `TransformerBridge` of `revision` of `source` (local: the folder source/revision), in eval mode.

    `dtype`: the weights' dtype (default float32); `hf_model`: an already built Hugging Face model
    to wrap instead of loading the revision's weights (the series loader copies them in itself).
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from transformer_lens.model_bridge import TransformerBridge

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = Path(source) / revision if local else source
    if local and not (where / "config.json").is_file():
        raise CheckpointError(f"{where} holds no saved Hugging Face model (config.json is missing)")
    options = {"device": device, "dtype": dtype or torch.float32, "hf_model": hf_model}
    try:
        if local:
            bridge = TransformerBridge.boot_transformers(str(where), **options)
        else:
            bridge = TransformerBridge.boot_transformers(source, revision=revision, **options)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for missing or bad weights
        raise CheckpointError(f"cannot load revision {revision!r} of {source}: {type(exc).__name__}: {exc}") from exc
    bridge.eval()
    return bridge


def boot_reference(checkpoint: Path, device: Any = None):
    """The model a reference checkpoint points to."""
    ref = read_reference(checkpoint)
    return boot_revision(ref["source"], ref["revision"], bool(ref.get("local")), device)


def boot_config(cfg) -> Any:
    """`build_model` for kind `hf`: the revision the config names."""
    return boot_revision(cfg.source, cfg.revision, cfg.local)
