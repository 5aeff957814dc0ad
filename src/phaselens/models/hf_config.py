"""The `hf` model kind: a Hugging Face model wrapped by TransformerLens's `TransformerBridge` (torch-free).

An imported checkpoint series (`phaselens import-hf`) records one of these in run.json. The
shape fields are read from the bridge at import time and are informational: the weights, and
the architecture, come from the referenced revision whenever it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from phaselens.errors import ConfigError
from phaselens.models.config import ModelSpec, register_model

if TYPE_CHECKING:
    from phaselens.models.adapter import ModelAdapter


@register_model("hf", "phaselens.models.hf:boot_config")
@dataclass
class HFModelConfig(ModelSpec):
    kind: str = "hf"
    source: str = ""  # a model name on the Hugging Face hub, or a local MODEL_DIR with one folder per revision
    local: bool = False  # True: revision r lives in source/r
    revision: str = ""  # the revision `build_model` boots (an imported series: its last one)
    architecture: str = ""
    n_layers: int = 0
    n_heads: int = 0
    d_model: int = 0
    d_vocab: int = 0
    n_ctx: int = 0

    @classmethod
    def of(cls, adapter: "ModelAdapter", source: str, local: bool = False, revision: str = "") -> "HFModelConfig":
        """The record of the model `adapter` reads, found at `source` (its architecture and dimensions as the adapter
        reads them, so every run that records a Hugging Face model reads them one way)."""
        return cls(source=source, local=local, revision=revision, architecture=adapter.architecture, n_layers=adapter.n_layers,
                   n_heads=adapter.n_heads, d_model=adapter.d_model, d_vocab=adapter.d_vocab, n_ctx=adapter.n_ctx)

    def validate(self, prefix: str = "model") -> None:
        if not self.source:
            raise ConfigError(f"{prefix}.source must name a Hugging Face model or a local model directory")
