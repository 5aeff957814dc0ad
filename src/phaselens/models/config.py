"""Model configurations and their registry; torch-free so configs validate before anything heavy loads.

`model.kind` picks the architecture: each kind registers its config class and the import path
of its `nn.Module` (built lazily). Every config exposes `n_ctx` and `d_vocab`, which tasks use.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable

from phaselens.errors import ConfigError
from phaselens.registry import register

_KINDS: dict[str, tuple[type, str]] = {}


def register_model(kind: str, module_class: str) -> Callable[[type], type]:
    """Class decorator: `model.kind=<kind>` selects this config; `module_class` is "package.module:Class".
    A second config under a taken kind is refused, naming both (`phaselens.registry`)."""

    def add(cls: type) -> type:
        register(_KINDS, kind, (cls, module_class), "model kind")
        return cls

    return add


def model_config_class(kind: str) -> type:
    _load_builtin()
    if kind not in _KINDS:
        raise ConfigError(f"model.kind must be one of {sorted(_KINDS)}, got {kind!r}")
    return _KINDS[kind][0]


def model_class(kind: str) -> type:
    """The `nn.Module` class of `kind` (imports torch and the model's module)."""
    model_config_class(kind)
    module, name = _KINDS[kind][1].split(":")
    return getattr(import_module(module), name)


def _load_builtin() -> None:
    from phaselens.plugins import load_package

    load_package("phaselens.models", suffix="_config")  # the transformer registers below; every other kind in its *_config module


# What a model may offer a probe beyond residual streams, logits and parameters, which every model has
# (`Needs.parts` names these); each kind's config says which it has (`ModelSpec.offers`), before any weight loads.
MODEL_PARTS = {
    "attention_patterns": "softmax attention patterns (blocks.{l}.attn.hook_pattern)",
    "final_norm": "a final norm before the unembedding (ln_final)",
    "residual_patching": "a forward that resumes from a patched residual stream",
    "mlp_neurons": "MLP neurons (blocks.{l}.mlp.hook_post)",
    "edge_graph": "per-head outputs and per-head q/k/v inputs to patch (the circuits graph)",
}


@dataclass
class ModelSpec:
    """What every model config has: its kind (the registry key)."""

    kind: str = "transformer"

    @classmethod
    def resolve(cls, raw: dict[str, Any]) -> type:
        """The registered config class for `raw['kind']` (the config loader calls this)."""
        return model_config_class(raw.get("kind", "transformer"))

    def validate(self, prefix: str = "model") -> None:
        """Refuse impossible shapes, naming the key at fault (each kind checks its own)."""

    def offers(self) -> frozenset[str]:
        """The `MODEL_PARTS` this architecture has (every one, unless a kind says otherwise)."""
        return frozenset(MODEL_PARTS)

    def lacks_hint(self) -> str:
        """What to do instead, said after a probe is refused for a part this model lacks."""
        return ""


@register_model("transformer", "phaselens.models.transformer:Transformer")
@dataclass
class ModelConfig(ModelSpec):
    """Shape of a decoder-only transformer; `d_mlp=0` means attention-only."""

    n_layers: int = 2
    n_heads: int = 2
    d_model: int = 64
    d_head: int = 0  # 0: d_model // n_heads
    d_mlp: int = 0
    d_vocab: int = 64
    n_ctx: int = 64
    act_fn: str = "gelu"
    normalization: str = "LN"  # "LN" or "none"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_head == 0 and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.d_head = self.d_model // self.n_heads

    def validate(self, prefix: str = "model") -> None:
        """Refuse impossible shapes, naming the key at fault."""
        for key in ("n_layers", "n_heads", "d_model", "d_vocab", "n_ctx"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key} must be >= 1, got {getattr(self, key)}")
        if self.d_head < 0:
            raise ConfigError(f"{prefix}.d_head must be >= 1 (or 0 for d_model // n_heads), got {self.d_head}")
        if self.d_head == 0:
            raise ConfigError(
                f"{prefix}.d_head is unset and {prefix}.d_model={self.d_model} is not divisible by "
                f"{prefix}.n_heads={self.n_heads}; set {prefix}.d_head explicitly"
            )
        if self.d_mlp < 0:
            raise ConfigError(f"{prefix}.d_mlp must be >= 0 (0 = attention-only), got {self.d_mlp}")
        if self.act_fn not in ("gelu", "relu"):
            raise ConfigError(f"{prefix}.act_fn must be 'gelu' or 'relu', got {self.act_fn!r}")
        if self.normalization not in ("LN", "none"):
            raise ConfigError(f"{prefix}.normalization must be 'LN' or 'none', got {self.normalization!r}")
        if not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise ConfigError(f"{prefix}.init_std must be a finite number > 0, got {self.init_std}")

    def offers(self) -> frozenset[str]:
        return frozenset(MODEL_PARTS) - ({"mlp_neurons"} if self.attn_only else set())

    def lacks_hint(self) -> str:
        return "this model is attention-only: set model.d_mlp" if self.attn_only else ""

    @property
    def attn_only(self) -> bool:
        return self.d_mlp == 0
