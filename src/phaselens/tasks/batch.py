"""The batch every task produces and every probe reads, with the task's named position sets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from phaselens.errors import RunError

POSITION_PREFIX = "positions."  # safetensors key of a position set: "positions.copy"
LEGACY_MASKS = ("copy", "source", "first_target", "selector")  # probe batches saved before position sets: "<name>_mask"
LEGACY_NAMES = {"selector": "z"}  # an old set's name today


@dataclass(frozen=True)
class TaskBatch:
    """Token sequences, the training loss mask, and the task's named position sets.

    A position set is a bool mask over the batch, of one of two shapes:

    * (B, T-1), a set of *predictions*: position t is the prediction of token t+1 from logits[:, t]
      (e.g. `copy`: the predictions an induction head can make; `first_target`; `answer`);
    * (B, T), a set of *tokens* (e.g. `source`: the tokens the copies come from; `z`: the selector).

    Probes name the sets they read (through their options, whose defaults the task declares) and
    never ask which task made the batch. `pair_index` pairs rows for activation patching.
    """

    tokens: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T-1) bool: positions the training loss counts
    positions: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, T-1) or (B, T) bool
    pair_index: torch.Tensor | None = None  # (B,) long: the row paired with this one for patching (-1: none)

    @classmethod
    def coerce(cls, batch: "TaskBatch | torch.Tensor") -> "TaskBatch":
        """A batch from tokens alone (every position counts, no position sets); a TaskBatch passes through."""
        if isinstance(batch, TaskBatch):
            return batch
        B, T = batch.shape
        return cls(tokens=batch, loss_mask=torch.ones(B, T - 1, dtype=torch.bool, device=batch.device))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    # ------------------------------------------------------------------ position sets

    def _named(self, name: str, reader: str) -> torch.Tensor:
        if name not in self.positions:
            have = ", ".join(sorted(self.positions)) or "none"
            raise ValueError(f"{reader} reads the position set {name!r}, which this task's batches do not have "
                             f"(they have: {have}); set the probe's options to one of those")
        return self.positions[name]

    def predictions(self, name: str, reader: str = "a probe") -> torch.Tensor:
        """Prediction set `name` within the loss mask: (B, T-1). "loss" names the loss mask itself."""
        if name == "loss":
            return self.loss_mask
        mask = self._named(name, reader)
        if mask.shape[1] != self.tokens.shape[1] - 1:
            raise ValueError(f"{reader} needs a set of predictions (B, T-1); {name!r} is a set of tokens (B, T)")
        return mask & self.loss_mask

    def token_positions(self, name: str, reader: str = "a probe") -> torch.Tensor:
        """Set `name` as token positions (B, T); a prediction set marks the query that makes each prediction."""
        mask = self._named(name, reader)
        if mask.shape[1] == self.tokens.shape[1] - 1:  # prediction t is made at query t; the last token predicts nothing
            mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
        return mask

    def rolled(self, name: str, reader: str = "a probe") -> torch.Tensor:
        """Tokens with token set `name` replaced by the next row's (a cyclic shift, a derangement of the rows): (B, T).

        Every row marks the same positions in the sets this is used on (a selector), so whole sets move.
        """
        return torch.where(self.token_positions(name, reader), self.tokens.roll(-1, dims=0), self.tokens)

    # ------------------------------------------------------------------ rows and devices

    def _map(self, fn) -> "TaskBatch":
        return TaskBatch(tokens=fn(self.tokens), loss_mask=fn(self.loss_mask),
                         positions={k: fn(v) for k, v in self.positions.items()},
                         pair_index=None if self.pair_index is None else fn(self.pair_index))

    def to(self, device: torch.device | str) -> "TaskBatch":
        return self._map(lambda t: t.to(device))

    def clone(self) -> "TaskBatch":
        """A copy that owns its tensors (a caller may refill the original's buffers in place)."""
        return self._map(torch.clone)

    def rows(self, index: slice) -> "TaskBatch":
        """The rows in `index`; a pair whose partner falls outside them loses it (-1)."""
        picked = self._map(lambda t: t[index])
        if self.pair_index is None:
            return picked
        start, stop, _ = index.indices(len(self))
        assert picked.pair_index is not None  # mapped from ours, which is set
        partner = picked.pair_index - start
        kept = torch.where((self.pair_index[index] >= 0) & (partner >= 0) & (partner < stop - start), partner, -1)
        return replace(picked, pair_index=kept)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by its file key: tokens, loss_mask, positions.<name>, pair_index."""
        out = {"tokens": self.tokens, "loss_mask": self.loss_mask}
        out.update({POSITION_PREFIX + k: v for k, v in self.positions.items()})
        if self.pair_index is not None:
            out["pair_index"] = self.pair_index
        return out

    def save(self, path: Path) -> None:
        """Write the batch as safetensors (masks as uint8), so every checkpoint is probed on it."""
        from safetensors.torch import save_file

        from phaselens.store.atomic import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.to(torch.uint8) if v.dtype == torch.bool else v.contiguous() for k, v in self.tensors().items()}, str(tmp))

    @classmethod
    def load(cls, path: Path) -> "TaskBatch":
        """A saved batch; one saved before position sets (copy_mask, selector_mask, ...) loads with them as sets."""
        from safetensors.torch import load_file

        if Path(path).exists() and not Path(path).is_file():  # a FIFO would block the read forever
            raise RunError(f"{path} is not a regular file (a FIFO, device or folder); phaselens reads only regular files")
        raw = load_file(str(path))
        positions = {k[len(POSITION_PREFIX):]: v.bool() for k, v in raw.items() if k.startswith(POSITION_PREFIX)}
        for old in LEGACY_MASKS:
            if f"{old}_mask" in raw:
                positions[LEGACY_NAMES.get(old, old)] = raw[f"{old}_mask"].bool()
        return cls(tokens=raw["tokens"], loss_mask=raw["loss_mask"].bool(), positions=positions, pair_index=raw.get("pair_index"))

