"""Hookable models. `Transformer` is imported lazily: it pulls in TransformerLens."""

from phaselens.models.config import ModelConfig

__all__ = ["ModelConfig", "build_model"]


def build_model(cfg: ModelConfig):
    """A fresh `Transformer` for `cfg` (imports torch and TransformerLens on first use)."""
    from phaselens.models.transformer import Transformer

    return Transformer(cfg)
