"""The `data` section of a run trained by a `transformers.Trainer` with `pl.TelemetryCallback` (torch-free).

The training data is the Trainer's dataset, which phaselens does not keep: the run stores the
probe batch (its first sequences) and their token counts, and probes read those; heads, attention_to
and patching read the induction batch the callback stores beside them (random ordinary ids of the
model's tokenizer with a repeated segment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.induction_config import INDUCTION_BATCH_OPTIONS
from phaselens.tasks.study import Study


@register_task("hf_trainer")
@dataclass
class HFTrainerData(DataConfig):
    """Sequences of `seq_len` token ids from a Trainer's train_dataset; `probe_size` of them are the probe batch."""

    task: str = "hf_trainer"
    seq_len: int = 0
    dataset: str = ""  # what the dataset was (its class and length), for the report
    rebuildable: ClassVar[bool] = False

    # the probe batch is the user's data, without position sets: heads (and, by name, attention_to and
    # patching) read the induction batch the callback writes beside it
    study: ClassVar[Study] = Study(
        live_probes=("attention", "heads", "loss"),
        post_hoc_probes=("attention", "heads", "loss", "logit_lens", "geometry"),
        position_sets=(),  # plain text: no named positions (heads and friends read the induction batch)
        probe_options=INDUCTION_BATCH_OPTIONS,
        induction_batch=True,
    )

    def build(self, model: Any):
        raise ConfigError("a Trainer run's data is the Trainer's dataset, which phaselens does not keep; "
                          "its probe batch (probe_batch.safetensors) and token counts (unigram.json) are in the run")
