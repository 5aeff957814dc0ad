"""Hookable models, built lazily by kind (importing one pulls in torch and TransformerLens)."""

from typing import Any

from phaselens.models.config import ModelConfig, ModelSpec, model_class, register_model

__all__ = ["ModelConfig", "ModelSpec", "build_model", "register_model"]


def build_model(cfg: ModelSpec) -> Any:
    """A fresh model for `cfg` (its `kind` picks the architecture)."""
    return model_class(cfg.kind)(cfg)
