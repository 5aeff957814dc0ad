"""The `data` section of a run trained by a `transformers.Trainer` with `pl.TelemetryCallback` (torch-free).

The training data is the Trainer's dataset, which phaselens does not keep: the run stores the
probe batch (its first sequences) and their token counts, and probes read those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.study import Study


@register_task("hf_trainer")
@dataclass
class HFTrainerData(DataConfig):
    """Sequences of `seq_len` token ids from a Trainer's train_dataset; `probe_size` of them are the probe batch."""

    task: str = "hf_trainer"
    seq_len: int = 0
    dataset: str = ""  # what the dataset was (its class and length), for the report

    # the batch is the user's data: it has no named position sets to patch or attend to
    study: ClassVar[Study] = Study(
        live_probes=("attention", "heads", "loss"),
        post_hoc_probes=("attention", "heads", "loss", "logit_lens", "geometry"),
        inapplicable_probes={
            "attention_to": "needs the task's copy and source positions",
            "patching": "needs pairs of prompts with the task's source positions",
            "random_z": "the Trainer's batches have no selector z",
        },
    )

    def build(self, model: Any):
        raise ConfigError("a Trainer run's data is the Trainer's dataset, which phaselens does not keep; "
                          "its probe batch (probe_batch.safetensors) and token counts (unigram.json) are in the run")
