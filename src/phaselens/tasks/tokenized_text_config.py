"""The `data` section of the tokenized_text task: fixed-length crops of a local text file (torch-free).

An imported checkpoint series measures its probes on such crops, tokenised with the model's
own tokenizer. The task has no copy or source positions: heads, attention_to and patching read the
run's induction batch instead (`Study.induction_batch`). attention_to and patching are measured by
name only: patching runs a forward per residual stream, which at public size costs several times all
the default probes together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.induction_config import INDUCTION_BATCH_OPTIONS
from phaselens.tasks.study import POST_HOC_PROBES, Study


@register_task("tokenized_text")
@dataclass
class TokenizedTextData(DataConfig):
    """Crops of `seq_len` tokens from `path`, tokenised with `tokenizer` (a model folder or hub name)."""

    task: str = "tokenized_text"
    path: str = ""
    tokenizer: str = ""
    tokenizer_revision: str = ""
    seq_len: int = 128

    # heads (and, by name, attention_to and patching) read the run's induction batch, stored beside the text one
    study: ClassVar[Study] = Study(
        post_hoc_probes=(*POST_HOC_PROBES, "geometry"),
        position_sets=(),  # plain text: no named positions (heads and friends read the induction batch)
        probe_options={**INDUCTION_BATCH_OPTIONS, "loss": {"icl_score": True}},
        induction_batch=True,
    )

    def build(self, model: Any, tokenizer: Any = None):
        """The task; pass `tokenizer` when it is already loaded (else it loads from `self.tokenizer`)."""
        from phaselens.tasks.tokenized_text import TokenizedTextTask

        if not Path(self.path).is_file():
            raise ConfigError(f"data.path: text file {self.path!r} does not exist")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        n_ctx = getattr(model, "n_ctx", 0)
        if n_ctx and self.seq_len > n_ctx:
            raise ConfigError(f"data.seq_len={self.seq_len} exceeds the model's context ({n_ctx})")
        return TokenizedTextTask(path=self.path, tokenizer=tokenizer or self.tokenizer, revision=self.tokenizer_revision, seq_len=self.seq_len)
