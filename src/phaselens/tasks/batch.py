"""The batch every task produces and every probe reads."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class TaskBatch:
    """Token sequences plus masks over next-token prediction positions.

    Position t of a mask (B, T-1) refers to the prediction of token t+1 from logits[:, t].
    """

    tokens: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T-1) bool: positions the training loss counts
    copy_mask: torch.Tensor | None = None  # (B, T-1) bool: predictions an induction head can make
    source_mask: torch.Tensor | None = None  # (B, T) bool: token positions the copies come from

    @classmethod
    def coerce(cls, batch: "TaskBatch | torch.Tensor") -> "TaskBatch":
        """A batch from tokens alone (every position counts, no task masks); a TaskBatch passes through."""
        if isinstance(batch, TaskBatch):
            return batch
        B, T = batch.shape
        return cls(tokens=batch, loss_mask=torch.ones(B, T - 1, dtype=torch.bool, device=batch.device))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "TaskBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if getattr(self, f.name) is not None})

    def rows(self, index: slice) -> "TaskBatch":
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self) if getattr(self, f.name) is not None})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def save(self, path: Path) -> None:
        """Write the batch as safetensors (masks as uint8), so every checkpoint is probed on it."""
        from safetensors.torch import save_file

        from phaselens.store.atomic import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.to(torch.uint8) if v.dtype == torch.bool else v.contiguous() for k, v in self.tensors().items()}, str(tmp))

    @classmethod
    def load(cls, path: Path) -> "TaskBatch":
        from safetensors.torch import load_file

        raw = load_file(str(path))
        return cls(**{k: v.bool() if k.endswith("_mask") else v for k, v in raw.items()})


def concat(a: TaskBatch, b: TaskBatch) -> TaskBatch:
    """Stack two batches of the same task along the batch dimension."""
    names = [f.name for f in fields(a) if getattr(a, f.name) is not None]
    return replace(a, **{n: torch.cat([getattr(a, n), getattr(b, n)]) for n in names})
