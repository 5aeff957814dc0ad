"""The `data` section of the induction task (torch-free; the task itself lives in `induction`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.study import INDUCTION_SETS, POST_HOC_PROBES, Phenomenon, Study


# How attention_to, patching and circuits read an induction batch (this task's, or the induction batch an
# imported series stores beside its text batch): from the copies to the first occurrence. The circuits
# pairs: the first occurrence replaced by fresh ordinary tokens, metric = the copies' loss.
INDUCTION_BATCH_OPTIONS = {
    "attention_to": {"query": "copy", "key": "source"},
    "patching": {"patch": "source", "read": "copy", "corrupt": "noise"},
    "circuits": {"patch": "source", "read": "copy"},
}


@register_task("induction")
@dataclass
class InductionData(DataConfig):
    """Random tokens with a segment repeated; sequences fill the model's context over its vocabulary."""

    variant: str = "variable_offset"  # or "half_repeat" (solvable by a positional shortcut)
    min_len: int = 8
    max_len: int = 24

    # position sets: `copy` (the predictions of repeated tokens) and `source` (the first occurrence's tokens)
    study: ClassVar[Study] = Study(
        post_hoc_probes=(*POST_HOC_PROBES, "attention_to", "patching"),
        probe_options={
            "loss": {"positions": ["copy"], "complements": ["copy"]},  # copy, non_copy
            **INDUCTION_BATCH_OPTIONS,
        },
        position_sets=INDUCTION_SETS,
        phenomenon=Phenomenon("loss", "copy", "fall", min_change=0.5,
                              description="the copy-position loss drops (each drop of at least 0.5 nats)"),
    )

    def build(self, model: Any):
        from phaselens.tasks.induction import InductionTask

        return InductionTask(seq_len=model.n_ctx, vocab=model.d_vocab, min_len=self.min_len, max_len=self.max_len, variant=self.variant)
