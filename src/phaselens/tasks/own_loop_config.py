"""The `data` section of a run written by `pl.Telemetry(model, run=DIR)` in the user's own loop (torch-free).

The training data is the user's, which phaselens never sees whole: the run keeps the first batch the
telemetry measured as its probe batch, which every probe (head scores included) reads post-hoc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.study import Study


@register_task("own_loop")
@dataclass
class OwnLoopData(DataConfig):
    """Batches of `seq_len` tokens from the user's loop; the first measured one is the probe batch."""

    task: str = "own_loop"
    seq_len: int = 0
    rebuildable: ClassVar[bool] = False

    study: ClassVar[Study] = Study(
        live_probes=("attention", "heads", "loss"),
        # no geometry by default: its unigram needs the training data's token counts, which the run does not have
        post_hoc_probes=("attention", "heads", "loss", "logit_lens"),
    )

    def build(self, model: Any):
        raise ConfigError("data.task=own_loop is a run of your own training loop (pl.Telemetry(run=...)), which keeps "
                          "no training data; its probe batch (probe_batch.safetensors, the first batch measured) is in the run")
