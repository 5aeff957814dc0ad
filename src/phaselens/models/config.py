"""Model configuration; torch-free so configs can be validated before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass

from phaselens.errors import ConfigError


@dataclass
class ModelConfig:
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
        if not self.init_std > 0:
            raise ConfigError(f"{prefix}.init_std must be > 0, got {self.init_std}")

    @property
    def attn_only(self) -> bool:
        return self.d_mlp == 0
