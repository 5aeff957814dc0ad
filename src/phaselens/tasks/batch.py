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
    first_target_mask: torch.Tensor | None = None  # (B, T-1) bool: the prediction of the first target token
    selector_mask: torch.Tensor | None = None  # (B, T) bool: selector (z) positions
    pair_index: torch.Tensor | None = None  # (B,) long: the row paired with this one for patching (-1: none)

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

    def clone(self) -> "TaskBatch":
        """A copy that owns its tensors (a caller may refill the original's buffers in place)."""
        return replace(self, **{f.name: getattr(self, f.name).clone() for f in fields(self) if getattr(self, f.name) is not None})

    def rows(self, index: slice) -> "TaskBatch":
        """The rows in `index`; a pair whose partner falls outside them loses it (-1)."""
        picked = {f.name: getattr(self, f.name)[index] for f in fields(self) if getattr(self, f.name) is not None}
        if self.pair_index is not None:
            start, stop, _ = index.indices(len(self))
            partner = picked["pair_index"] - start
            picked["pair_index"] = torch.where((self.pair_index[index] >= 0) & (partner >= 0) & (partner < stop - start), partner, -1)
        return replace(self, **picked)

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
    joined = {n: torch.cat([getattr(a, n), getattr(b, n)]) for n in names}
    if a.pair_index is not None:  # b's partners are rows of b: shift them past a's rows
        joined["pair_index"] = torch.cat([a.pair_index, torch.where(b.pair_index >= 0, b.pair_index + len(a), -1)])
    return replace(a, **joined)
