"""The `model` section for BDH ("Baby Dragon Hatchling"); torch-free, like every model config."""

from __future__ import annotations

from dataclasses import dataclass

from phaselens.errors import ConfigError
from phaselens.models.config import ModelSpec, register_model


@register_model("bdh", "phaselens.models.bdh:BDH")
@dataclass
class BDHConfig(ModelSpec):
    """BDH: one set of weights applied `n_layers` times; N = multiplier·d_model/n_heads neurons per head."""

    kind: str = "bdh"
    n_layers: int = 6
    d_model: int = 256  # D (n_embd)
    n_heads: int = 4  # nh
    multiplier: int = 128  # mlp_internal_dim_multiplier
    d_vocab: int = 256  # bytes
    n_ctx: int = 512  # block size: the longest input (RoPE itself has no limit)
    dropout: float = 0.1

    @property
    def n_neurons(self) -> int:
        """N, the neurons per head (the sparse layer has n_heads·N in all)."""
        return self.multiplier * self.d_model // self.n_heads

    def validate(self, prefix: str = "model") -> None:
        for key in ("n_layers", "d_model", "n_heads", "multiplier", "d_vocab", "n_ctx"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key} must be >= 1, got {getattr(self, key)}")
        if (self.multiplier * self.d_model) % self.n_heads:
            raise ConfigError(
                f"{prefix}.multiplier·{prefix}.d_model = {self.multiplier * self.d_model} must be divisible by "
                f"{prefix}.n_heads={self.n_heads} (N = multiplier·d_model/n_heads neurons per head)"
            )
        if self.n_neurons % 2:
            raise ConfigError(f"{prefix}: N = multiplier·d_model/n_heads = {self.n_neurons} must be even (RoPE rotates pairs)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout must be in [0, 1), got {self.dropout}")

    def offers(self) -> frozenset[str]:
        # linear attention (no softmax pattern), no final norm (every pass ends in one), no resumable residual forward
        return frozenset({"mlp_neurons"})  # its sparse neurons, blocks.{l}.hook_xy_sparse

    def lacks_hint(self) -> str:
        return "BDH runs use the loss, neurons, geometry and llc probes"
