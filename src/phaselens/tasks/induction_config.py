"""The `data` section of the induction task (torch-free; the task itself lives in `induction`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phaselens.tasks.config import DataConfig, register_task


@register_task("induction")
@dataclass
class InductionData(DataConfig):
    """Random tokens with a segment repeated; sequences fill the model's context over its vocabulary."""

    variant: str = "variable_offset"  # or "half_repeat" (solvable by a positional shortcut)
    min_len: int = 8
    max_len: int = 24

    def build(self, model: Any):
        from phaselens.tasks.induction import InductionTask

        return InductionTask(seq_len=model.n_ctx, vocab=model.d_vocab, min_len=self.min_len, max_len=self.max_len, variant=self.variant)
