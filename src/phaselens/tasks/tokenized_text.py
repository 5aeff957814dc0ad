"""Tokenized text task: seeded random crops of a tokenised local text file."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from phaselens.errors import ConfigError
from phaselens.models.adapter import HFTokenizer, Tokenizer
from phaselens.tasks.batch import TaskBatch


class TokenizedTextTask:
    """Crops of `seq_len` tokens of the file at `path`; `tokenizer` is a model folder, hub name or tokenizer object."""

    name = "tokenized_text"

    def __init__(self, path: str | Path, tokenizer: Any, seq_len: int, revision: str = ""):
        self.path, self.seq_len = Path(path), seq_len
        self._tokenizer, self._revision = tokenizer, revision or None

    @cached_property
    def tokenizer(self):
        if not isinstance(self._tokenizer, (str, Path)):
            return self._tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self._tokenizer), revision=self._revision)

    @cached_property
    def tokens(self) -> torch.Tensor:
        """The whole file as one token stream (N,)."""
        ids = self.tokenizer(self.path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        """`batch_size` crops at seeded random offsets; every prediction counts (loss_mask all True)."""
        self.validate()
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (batch_size,), generator=generator)  # (B,)
        tokens = self.tokens[starts[:, None] + torch.arange(self.seq_len)]  # (B, T)
        return TaskBatch(tokens=tokens, loss_mask=torch.ones(batch_size, self.seq_len - 1, dtype=torch.bool))

    def model_tokenizer(self, d_vocab: int) -> Tokenizer:
        """Text <-> ids for a model of this task: the Hugging Face tokenizer the text is tokenised with."""
        return HFTokenizer(self.tokenizer, d_vocab)

    def token_counts(self, d_vocab: int) -> torch.Tensor:
        """How often each token id occurs in the whole file: (d_vocab,)."""
        if int(self.tokens.max()) >= d_vocab:
            raise ConfigError(f"{self.path}: the tokenizer produced id {int(self.tokens.max())}, beyond the model's vocabulary ({d_vocab})")
        return torch.bincount(self.tokens, minlength=d_vocab)

    def validate(self) -> None:
        if len(self.tokens) == 0 and self.path.read_text(encoding="utf-8").strip():  # the text is there: its tokenizer is at fault
            raise ConfigError(f"the tokenizer turned the text of {self.path} into no tokens at all: it does not read this "
                              "text (a model revision saved without its tokenizer files? save them beside config.json)")
        if len(self.tokens) < self.seq_len:
            raise ConfigError(f"{self.path} has {len(self.tokens)} tokens; crops of data.seq_len={self.seq_len} need at least that many")
