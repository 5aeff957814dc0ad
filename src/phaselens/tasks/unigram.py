"""Token counts of a task's training data, for the unigram distribution of `kl_unigram`."""

from __future__ import annotations

import torch

UNIGRAM_BATCHES = 64  # 64 training batches: ~10^5 tokens for the demo task, plenty for a 64-token vocabulary


def sample_token_counts(task, d_vocab: int, batch_size: int, generator: torch.Generator,
                        batches: int = UNIGRAM_BATCHES) -> torch.Tensor:
    """Counts (d_vocab,) of the tokens in `batches` training batches drawn from `task`.

    A synthetic task's training stream is a distribution, not a corpus: a fresh sample of it
    (with its own generator, so training draws the same batches either way) counts its tokens.
    """
    counts = torch.zeros(d_vocab, dtype=torch.long)
    for _ in range(batches):
        tokens = task.sample(batch_size, generator, split="train").tokens  # (B, T)
        counts += torch.bincount(tokens.flatten(), minlength=d_vocab)[:d_vocab]
    return counts


UNIGRAM_SEED_OFFSET = 3_000_017  # its own stream: counting never shifts the training batches


def write_training_unigram(config, path) -> None:
    """Count the tokens of a run's training data (`config`: a RunConfig) into `path` (unigram.json)."""
    from phaselens.store.unigram import write_unigram_counts

    rng = torch.Generator().manual_seed(config.train.seed + UNIGRAM_SEED_OFFSET)
    size = config.train.batch_size
    if size == 0:  # full batch: the whole training split, counted once
        counts = sample_token_counts(config.build_task(), config.model.d_vocab, 0, rng, batches=1)
        write_unigram_counts(path, counts.tolist(), "the whole training split")
        return
    counts = sample_token_counts(config.build_task(), config.model.d_vocab, size, rng)
    write_unigram_counts(path, counts.tolist(), f"{UNIGRAM_BATCHES} sampled training batches of {size} sequences")
