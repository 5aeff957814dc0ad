"""Late disambiguation: a base B maps to K targets A₁..A_K, and a selector z picks one.

The dataset is drawn once from `data.seed`: K selector strings z shared by every base,
`n_unique_b` base strings B, and for each base K distinct target strings A (one per selector).
A sequence is `<BOS> B <SEP> z <SEP> A <EOS>` and the loss counts only A and EOS. B alone
leaves the first target token uncertain among K characters (loss log K); z removes that
uncertainty from step 0, yet SGD takes a long time to use it: the lag this task measures.

Batches carry what the probes need as named position sets: `first_target` (the prediction of the
first target token) and `z` (the selector's tokens, in the variants that have one); in the probe
split, `pair_index`: rows come in pairs with the same B, different z and a different first target,
for activation patching. Head scores read the run's induction batch instead, drawn from the characters
(`model_tokenizer`).
"""

from __future__ import annotations

import torch

from phaselens.models.adapter import IdTokenizer, Tokenizer
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.disambiguation_config import ALPHABET, BOS, EOS, PAD, SELECTOR_VARIANTS, SEP, VOCAB, DisambiguationData

N_CHARS = len(ALPHABET)


class DisambiguationTokenizer(IdTokenizer):
    """The task's plain ids: 0..35 the characters, PAD, BOS, EOS and SEP special (kept out of the induction batch)."""

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((PAD, BOS, EOS, SEP))

    @property
    def n_tokens(self) -> int:
        return VOCAB  # rows of a larger embedding are never trained


def _distinct_strings(n: int, length: int, generator: torch.Generator, taken: set | None = None,
                      first: torch.Tensor | None = None) -> torch.Tensor:
    """`n` random strings of `length` characters, distinct from each other and from `taken`: (n, length).

    `first` (n,) fixes the first character of each string.
    """
    taken = taken if taken is not None else set()
    out = torch.randint(0, N_CHARS, (n, length), generator=generator)  # (n, length)
    if first is not None:
        out[:, 0] = first
    for i in range(n):
        while tuple(out[i].tolist()) in taken:  # a rare collision: draw this one again
            out[i] = torch.randint(0, N_CHARS, (length,), generator=generator)
            if first is not None:
                out[i, 0] = first[i]
        taken.add(tuple(out[i].tolist()))
    return out


class DisambiguationTask:
    """The (B, z) → A task family; `sample(n, generator, split)` draws rows of its fixed dataset."""

    def __init__(self, config: DisambiguationData, n_ctx: int, d_vocab: int):
        self.config = config
        self.name = config.task
        self.n_ctx, self.d_vocab = n_ctx, d_vocab
        c = config
        rng = torch.Generator().manual_seed(c.seed)
        self.selectors = _distinct_strings(c.k, c.z_len, rng)  # (K, z_len)
        self.bases = _distinct_strings(c.n_unique_b, c.b_len, rng)  # (n_b, b_len)
        if c.shared_first_chars:  # one set of K characters, a random order of it per base
            chars = torch.randperm(N_CHARS, generator=rng)[: c.k]
            first = torch.stack([chars[torch.randperm(c.k, generator=rng)] for _ in range(c.n_unique_b)])  # (n_b, K)
        elif c.enforce_unique_a_first_char_per_b:
            first = torch.stack([torch.randperm(N_CHARS, generator=rng)[: c.k] for _ in range(c.n_unique_b)])  # (n_b, K)
        else:
            first = torch.randint(0, N_CHARS, (c.n_unique_b, c.k), generator=rng)
        # Targets are distinct across the whole dataset, so A → B is a function for the reversed variants.
        self.targets = _distinct_strings(c.n_unique_b * c.k, c.a_len, rng, first=first.reshape(-1))  # (n_b·K, a_len)
        self.train_pool, self.held_pool = self._split(rng)

    # ------------------------------------------------------------------ dataset

    @property
    def n_examples(self) -> int:
        return self.config.n_unique_b * self.config.k

    @property
    def has_selector(self) -> bool:
        return self.name in SELECTOR_VARIANTS

    def _split(self, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ids for training and for the held-out eval/probe set (empty: probe on training data)."""
        c = self.config
        every = torch.arange(self.n_examples)
        if c.probe_fraction <= 0:
            return every, every[:0]
        if c.split_by_base:
            held_bases = torch.randperm(c.n_unique_b, generator=rng)[: round(c.probe_fraction * c.n_unique_b)]
            held = torch.isin(every // c.k, held_bases)
        else:
            held = torch.zeros(self.n_examples, dtype=torch.bool)
            held[torch.randperm(self.n_examples, generator=rng)[: round(c.probe_fraction * self.n_examples)]] = True
        return every[~held], every[held]

    def pool(self, split: str) -> torch.Tensor:
        return self.train_pool if split == "train" or len(self.held_pool) == 0 else self.held_pool

    def layout(self) -> dict[str, slice]:
        """Token positions of the input, the selector (if any) and the output."""
        c = self.config
        reversed_ = self.name in ("az_to_b", "a_to_b")
        n_in, n_out = (c.a_len, c.b_len) if reversed_ else (c.b_len, c.a_len)
        start = 1 + n_in + 1
        spans = {"input": slice(1, 1 + n_in)}
        if self.has_selector:
            spans["selector"] = slice(start, start + c.z_len)
            start += c.z_len + 1
        spans["output"] = slice(start, start + n_out)
        return spans

    def sequences(self, examples: torch.Tensor) -> torch.Tensor:
        """Token sequences of example ids (example e = base e // K with selector e % K): (n, T)."""
        c = self.config
        base, choice = examples // c.k, examples % c.k
        b, z, a = self.bases[base], self.selectors[choice], self.targets[examples]
        left, right = (a, b) if self.name in ("az_to_b", "a_to_b") else (b, a)
        n = len(examples)
        col = lambda value: torch.full((n, 1), value, dtype=torch.long)  # noqa: E731
        parts = [col(BOS), left, col(SEP)] + ([z, col(SEP)] if self.has_selector else []) + [right, col(EOS)]
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ batches

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        """`batch_size` rows drawn with replacement from the split's examples; probe rows come in patching pairs."""
        pool = self.pool(split)
        pair_index = None
        if split == "probe" and self.has_selector:
            examples, pair_index = self._pairs(batch_size, pool, generator)
        else:
            examples = pool[torch.randint(0, len(pool), (batch_size,), generator=generator)]
        return self.batch(examples, pair_index)

    def _pairs(self, n: int, pool: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 2i and 2i+1 share B and differ in z and in the first target token; (n,) examples, (n,) partners."""
        k = self.config.k
        by_base: dict[int, list[int]] = {}
        for e in pool.tolist():
            by_base.setdefault(e // k, []).append(e)
        first = self.targets[:, 0].tolist()  # the first target character of every example
        eligible = [b for b, members in by_base.items() if len({first[e] for e in members}) >= 2]
        if not eligible:  # K = 1, or held-out examples that never share a base: no pairs
            return pool[torch.randint(0, len(pool), (n,), generator=generator)], torch.full((n,), -1, dtype=torch.long)
        examples, partner = [], []
        while len(examples) + 2 <= n:
            members = by_base[eligible[int(torch.randint(0, len(eligible), (1,), generator=generator))]]
            one = members[int(torch.randint(0, len(members), (1,), generator=generator))]
            others = [e for e in members if first[e] != first[one]]
            two = others[int(torch.randint(0, len(others), (1,), generator=generator))]
            i = len(examples)
            examples += [one, two]
            partner += [i + 1, i]
        if len(examples) < n:  # an odd batch: the last row has no partner
            examples.append(int(pool[torch.randint(0, len(pool), (1,), generator=generator)]))
            partner.append(-1)
        return torch.tensor(examples), torch.tensor(partner)

    def batch(self, examples: torch.Tensor, pair_index: torch.Tensor | None = None) -> TaskBatch:
        tokens = self.sequences(examples)  # (n, T)
        n, T = tokens.shape
        spans = self.layout()
        out = spans["output"]
        loss_mask = torch.zeros(n, T - 1, dtype=torch.bool)
        loss_mask[:, out.start - 1:] = True  # the output tokens and EOS
        first_target = torch.zeros(n, T - 1, dtype=torch.bool)
        first_target[:, out.start - 1] = True
        positions = {"first_target": first_target}
        if self.has_selector:
            positions["z"] = torch.zeros(n, T, dtype=torch.bool)
            positions["z"][:, spans["selector"]] = True
        return TaskBatch(tokens=tokens, loss_mask=loss_mask, positions=positions, pair_index=pair_index)

    def model_tokenizer(self, d_vocab: int) -> Tokenizer:
        """Ids for a model of this task: the run's induction batch (head scores) is drawn from the characters."""
        return DisambiguationTokenizer(d_vocab)

    def validate(self) -> None:
        """The config checked everything already (`DisambiguationData.validate`)."""
