"""Byte-level text: random crops of a file (or a built-in corpus) as token sequences.

Tokens are bytes (vocabulary 256). The first 90% of the bytes are the training split; the
last 10% are held out and serve both the eval loss and the probe batch, so checkpoints are
measured on text the model never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from phaselens.errors import ConfigError
from phaselens.models.adapter import ByteTokenizer, Tokenizer
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.text_config import split_point, unigram_entropy

BYTE_VOCAB = 256


@lru_cache(maxsize=4)
def _read_bytes(path: str, mtime: float) -> torch.Tensor:
    data = Path(path).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (n_bytes,)


def corpus_path(path: str | None, corpus: str | None) -> Path:
    """The file behind `data.path` or `data.corpus`."""
    if corpus == "shakespeare":
        from phaselens.tasks.shakespeare import shakespeare_path

        return shakespeare_path()
    file = Path(path or "")
    if not file.is_file():
        raise ConfigError(f"data.path={path!r}: no such file")
    return file


def decode(tokens: list[int] | torch.Tensor) -> str:
    """Bytes back to text (a byte cut out of a multi-byte character shows as U+FFFD)."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    return bytes(values).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class TextTask:
    """Crops of `seq_len` bytes; `split` picks the training bytes or the held-out ones."""

    path: str
    seq_len: int
    vocab: int = BYTE_VOCAB
    eval_fraction: float = 0.1

    name = "text"

    @classmethod
    def open(cls, path: str | None = None, corpus: str | None = None, seq_len: int = 256, vocab: int = BYTE_VOCAB,
             eval_fraction: float = 0.1) -> "TextTask":
        return cls(str(corpus_path(path, corpus)), seq_len, vocab, eval_fraction)

    @property
    def data(self) -> torch.Tensor:
        return _read_bytes(self.path, Path(self.path).stat().st_mtime)

    def split_bytes(self, split: str) -> torch.Tensor:
        """The bytes of a split: "train" the first 90%, "eval" and "probe" the last 10%."""
        data = self.data
        cut = split_point(len(data), self.eval_fraction)
        return data[:cut] if split == "train" else data[cut:]

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        """`batch_size` random crops of `seq_len` bytes from the split."""
        data = self.split_bytes(split)
        starts = torch.randint(0, len(data) - self.seq_len + 1, (batch_size,), generator=generator)  # (B,)
        index = starts[:, None] + torch.arange(self.seq_len)  # (B, T)
        tokens = data[index].long()  # (B, T)
        return TaskBatch(tokens=tokens, loss_mask=torch.ones(batch_size, self.seq_len - 1, dtype=torch.bool))

    def model_tokenizer(self, d_vocab: int) -> Tokenizer:
        """Text <-> ids for a model of this task: its bytes."""
        return ByteTokenizer(d_vocab)

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the training split's bytes: the loss of a model that ignores context."""
        return unigram_entropy(self.path, self.eval_fraction)

    def validate(self) -> None:
        if self.vocab != BYTE_VOCAB:
            raise ConfigError(f"data.task=text is byte-level: model.d_vocab must be {BYTE_VOCAB}, got {self.vocab}")
        held_out = len(self.split_bytes("eval"))
        if held_out < self.seq_len or len(self.split_bytes("train")) < self.seq_len:
            raise ConfigError(
                f"data.path={self.path}: {len(self.data)} bytes leave {held_out} held-out bytes, fewer than one "
                f"sequence of model.n_ctx={self.seq_len}; use a longer text or a shorter context"
            )
