"""Induction task: random tokens with one segment repeated later in the sequence.

The `variable_offset` variant (the default) draws the segment's length, its position and the
distance to its repeat per sequence, so the only way to predict the repeat is to find the
earlier occurrence of the current token and copy what followed it: an induction head.

The `half_repeat` variant repeats the first half of the sequence in the second half. Every
copy then sits at the same offset (T/2), so a positional head that attends T/2 − 1 tokens
back solves it without any induction mechanism; keep it only to demonstrate that shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.study import INDUCTION_MIN_LEN

VARIANTS = ("variable_offset", "half_repeat")
PROBE_MIN_LEN, PROBE_MAX_LEN = 8, 24
PROBE_MIN_SEQ_LEN = INDUCTION_MIN_LEN  # the shortest sequence an induction probe batch fits (`tasks.study`)
INDUCTION_SEED_OFFSET = 3_000_003  # a run's induction batch is drawn with its seed plus this (every writer of one)


@dataclass(frozen=True)
class InductionTask:
    """Generator of induction batches; `seq_len` and `vocab` follow the model's context and vocab."""

    seq_len: int
    vocab: int
    min_len: int = 8
    max_len: int = 24
    variant: str = "variable_offset"

    name = "induction"

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        """Draw `batch_size` sequences with their position sets: `copy` (predictions) and `source` (tokens).

        Every split draws from the same distribution (the generator keeps them apart).
        """
        B, T = batch_size, self.seq_len
        tokens = torch.randint(0, self.vocab, (B, T), generator=generator)  # (B, T)
        if self.variant == "half_repeat":
            length = torch.full((B,), T // 2)
            first = torch.zeros(B, dtype=torch.long)
            second = torch.full((B,), T // 2)
        else:
            length = torch.randint(self.min_len, self.max_len + 1, (B,), generator=generator)
            u = torch.rand(B, 2, generator=generator)  # (B, 2)
            first = (u[:, 0] * (T - 2 * length + 1)).long()  # segment start in [0, T - 2L]
            room = T - length - (first + length)  # the repeat starts in [first + L, T - L]
            second = first + length + (u[:, 1] * (room + 1)).long()
        pos = torch.arange(T)  # (T,)
        in_repeat = (pos >= second[:, None]) & (pos < (second + length)[:, None])  # (B, T)
        source = (pos - (second - first)[:, None]).clamp(min=0)  # (B, T)
        tokens = torch.where(in_repeat, tokens.gather(1, source), tokens)
        # Position t predicts token t+1; it is a copy when t and t+1 both lie in the repeat.
        pred = pos[:-1]  # (T-1,)
        copy_mask = (pred >= second[:, None]) & (pred < (second + length - 1)[:, None])  # (B, T-1)
        source_mask = (pos >= first[:, None]) & (pos < (first + length)[:, None])  # (B, T): the first occurrence
        return TaskBatch(tokens=tokens, loss_mask=torch.ones(B, T - 1, dtype=torch.bool),
                         positions={"copy": copy_mask, "source": source_mask})

    def validate(self) -> None:
        from phaselens.errors import ConfigError

        if self.variant not in VARIANTS:
            raise ConfigError(f"data.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.vocab < 2:  # one token: every sequence is that token repeated, a segment's copy is not told from the rest
            raise ConfigError(f"model.d_vocab={self.vocab}: the induction task draws random tokens and needs at least 2")
        if self.variant == "variable_offset":
            if not 2 <= self.min_len <= self.max_len:
                raise ConfigError(
                    f"data.min_len={self.min_len} and data.max_len={self.max_len} must satisfy 2 <= min_len <= max_len"
                )
            if 2 * self.max_len > self.seq_len:
                raise ConfigError(
                    f"data.max_len={self.max_len}: a segment and its repeat need 2*max_len <= model.n_ctx={self.seq_len}"
                )


def induction_probe_batch(token_ids: Sequence[int], seq_len: int, sequences: int, generator: torch.Generator) -> TaskBatch:
    """The induction task's construction in a model's own vocabulary: random tokens drawn from `token_ids`
    (a tokenizer's ordinary ids: no end-of-text or padding), one segment repeated at a variable offset.

    Sequences of `seq_len` tokens; segments of 8 to 24 tokens (sequences under 48 tokens: of up to seq_len // 2,
    and under 32 of at least seq_len // 4, so that the offset of the repeat still varies).
    Heads, attention_to and patching read it on runs whose own probe batch is text.
    """
    from phaselens.errors import ConfigError

    ids = torch.as_tensor(list(token_ids), dtype=torch.long)  # (n,)
    if len(ids) < 2:
        raise ConfigError(f"an induction probe batch needs at least 2 ordinary token ids, got {len(ids)}")
    max_len = min(PROBE_MAX_LEN, seq_len // 2)
    if seq_len < PROBE_MIN_SEQ_LEN:
        raise ConfigError(f"an induction probe batch needs sequences of at least 4 tokens (a segment and its repeat), got {seq_len}")
    task = InductionTask(seq_len=seq_len, vocab=len(ids), min_len=min(PROBE_MIN_LEN, max(2, seq_len // 4)), max_len=max_len)
    batch = task.sample(sequences, generator, split="probe")
    return replace(batch, tokens=ids[batch.tokens])  # positions 0..n-1 of the task become the model's ids
