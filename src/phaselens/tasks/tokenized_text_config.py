"""The `data` section of the tokenized_text task: fixed-length crops of a local text file (torch-free).

An imported checkpoint series measures its probes on such crops, tokenised with the model's
own tokenizer. The task has no copy or source masks, so the probes that need them are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.study import Study


@register_task("tokenized_text")
@dataclass
class TokenizedTextData(DataConfig):
    """Crops of `seq_len` tokens from `path`, tokenised with `tokenizer` (a model folder or hub name)."""

    task: str = "tokenized_text"
    path: str = ""
    tokenizer: str = ""
    tokenizer_revision: str = ""
    seq_len: int = 128

    # probes that read what text batches lack (a repeated segment, position sets), and why
    study: ClassVar[Study] = Study(
        post_hoc_probes=("attention", "loss", "logit_lens", "geometry"),
        inapplicable_probes={
            "heads": "head scores need the induction probe batch (a segment repeated at a variable offset)",
            "attention_to": "needs the task's copy and source positions",
            "patching": "needs pairs of prompts with the task's source positions",
            "random_z": "text batches have no selector z",
        },
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
