"""Modular addition, the grokking task: `a b = c` with c = (a + b) mod p (see `modular_addition_config`).

Pair (a, b) has id a·p + b. The training ids are a `train_fraction` of all p² ids, drawn once from
the data seed; the held-out ids are the rest. Batches carry two position sets over the predictions
(B, 3): `answer`, the prediction of c at the `=` position, and `train_pairs`, the same position on
rows whose pair is a training pair (every row of a training batch, none of an eval batch, the
training rows of the whole-grid probe batch).
"""

from __future__ import annotations

import torch

from phaselens.errors import ConfigError
from phaselens.tasks.batch import TaskBatch

ANSWER_POSITION = 2  # logits[:, 2], at `=`, predict token 3 (c)


class ModularAdditionTask:
    """The fixed dataset of one modulus and split; `sample(n, generator, split)` draws rows of a split (n = 0: all)."""

    name = "modular_addition"

    def __init__(self, p: int, train_fraction: float, seed: int):
        self.p = p
        rng = torch.Generator().manual_seed(seed)
        order = torch.randperm(p * p, generator=rng)  # (p²,)
        n_train = round(train_fraction * p * p)
        self.is_train = torch.zeros(p * p, dtype=torch.bool)  # (p²,) by pair id
        self.is_train[order[:n_train]] = True
        self.train_ids = torch.nonzero(self.is_train).flatten()  # ascending pair ids
        self.held_ids = torch.nonzero(~self.is_train).flatten()

    def ids(self, split: str) -> torch.Tensor:
        """The pair ids of a split: train, eval (the held-out pairs) or probe (every pair)."""
        if split == "train":
            return self.train_ids
        if split == "eval":
            return self.held_ids
        return torch.arange(self.p * self.p)

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        """`batch_size` rows drawn with replacement from the split's pairs; 0 gives every pair of the split, in id order."""
        pool = self.ids(split)
        if batch_size == 0:
            return self.batch(pool)
        return self.batch(pool[torch.randint(0, len(pool), (batch_size,), generator=generator)])

    def batch(self, ids: torch.Tensor) -> TaskBatch:
        """Rows `a b = c` of pair ids (n,): tokens (n, 4), the `answer` and `train_pairs` prediction sets (n, 3) and the
        `operand` token set (n, 4): the second operand b (the circuits probe changes it)."""
        p = self.p
        a, b = ids // p, ids % p
        tokens = torch.stack((a, b, torch.full_like(a, p), (a + b) % p), dim=1)  # (n, 4)
        answer = torch.zeros(len(ids), 3, dtype=torch.bool)
        answer[:, ANSWER_POSITION] = True  # (n, 3)
        operand = torch.zeros(len(ids), 4, dtype=torch.bool)
        operand[:, 1] = True  # (n, 4)
        return TaskBatch(tokens=tokens, loss_mask=answer,
                         positions={"answer": answer, "train_pairs": answer & self.is_train[ids][:, None], "operand": operand})

    def validate(self) -> None:
        """The config checked the options already (`ModularAdditionData.validate`)."""
        if len(self.train_ids) == 0 or len(self.held_ids) == 0:
            raise ConfigError("modular addition needs both training and held-out pairs; change data.train_fraction")
