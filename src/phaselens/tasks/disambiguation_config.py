"""The `data` section of the late-disambiguation tasks (torch-free; the task lives in `disambiguation`).

One config class serves the four variants; `data.task` picks which:

* `bz_to_a` (default): `<BOS> B <SEP> z <SEP> A <EOS>`; B alone is ambiguous (K targets), z selects one.
* `az_to_b`: `<BOS> A <SEP> z <SEP> B <EOS>`; A already determines B, so z is redundant.
* `b_to_a`: `<BOS> B <SEP> A <EOS>`; no selector: the first target token keeps an irreducible loss of log K
  when the K first characters of a base's targets are distinct.
* `a_to_b`: `<BOS> A <SEP> B <EOS>`; one-to-one, the easy control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.study import POST_HOC_PROBES, Axis, Headline, Phenomenon, Study

VARIANTS = ("bz_to_a", "az_to_b", "b_to_a", "a_to_b")
SELECTOR_VARIANTS = ("bz_to_a", "az_to_b")  # the variants with a selector z
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # 36 characters, token ids 0..35
PAD, BOS, EOS, SEP = 36, 37, 38, 39
VOCAB = 40

# τ against the number of examples D = n_unique_b·K and the ambiguity K: the lag's headline is
# τ ∝ D^1.2 with τ independent of K at fixed D.
TAU = Headline(
    "disambiguation", "tau", description="τ = first step where the first-target loss is below 0.5·log K",
    axes=(Axis("D", ("data.n_unique_b", "data.k"), description="examples: bases × K"),
          Axis("K", ("data.k",), description="ambiguity: targets per base")),
)
# The phenomenon: the first-target loss drops *from* the log K plateau (not its descent to it, which is often stronger)
DROP_FROM_PLATEAU = Phenomenon("loss", "first_target", "fall", leaves_log_of="data.k",
                               description="the first-target loss drops from the log K plateau")
# Position sets: `first_target` (the prediction of the first target token) and, with a selector, `z`.
# Head scores need a segment and its repeat, which these sequences lack: every variant's runs store an
# induction batch of the characters for `heads`; attention_to and patching keep reading z on the task's batch.
SELECTOR_STUDY = Study(
    position_sets=("first_target", "z"),
    post_hoc_probes=(*POST_HOC_PROBES, "attention_to", "patching", "random_z"),
    probe_options={
        "loss": {"positions": ["first_target"], "shuffle": "z"},  # first_target, z_shuffled, z_shuffle_gap
        "logit_lens": {"positions": "first_target"},  # the token that needs z
        "attention_to": {"query": "first_target", "key": "z"},
        "patching": {"patch": "z", "read": "first_target", "corrupt": "partner"},
        "random_z": {"selector": "z", "read": "first_target"},
        "circuits": {"patch": "z", "read": "first_target", "corrupt": "partner"},  # z swapped within a pair (same B)
    },
    induction_batch=True,
    reads_batch={"attention_to": "probe", "patching": "probe", "circuits": "probe"},
    headline=TAU,
    phenomenon=DROP_FROM_PLATEAU,
)
PLAIN_STUDY = Study(  # no selector z: attention_to, patching and random_z have nothing to read
    position_sets=("first_target",),
    probe_options={"loss": {"positions": ["first_target"]}, "logit_lens": {"positions": "first_target"}},
    induction_batch=True,
    headline=TAU,
    phenomenon=DROP_FROM_PLATEAU,
)


@register_task(*VARIANTS)
@dataclass
class DisambiguationData(DataConfig):
    """K selectors z shared by every base B; each base has K distinct targets A, one per selector."""

    task: str = "bz_to_a"
    k: int = 10  # ambiguity: targets per base (and number of selector strings)
    n_unique_b: int = 100  # bases; n_unique_b·k examples in all
    b_len: int = 6
    a_len: int = 4
    z_len: int = 2
    enforce_unique_a_first_char_per_b: bool = True  # a base's K targets start with K different characters
    shared_first_chars: bool = False  # every base's targets start with the same K characters (in its own order)
    probe_fraction: float = 0.0  # held-out share of examples for the eval and probe batches (0: probe on training data)
    split_by_base: bool = False  # hold out whole bases instead of single examples
    seed: int = 0  # draws the dataset (bases, selectors, targets) once, so every split sees the same one

    @classmethod
    def study_for(cls, task: str) -> Study:
        """With a selector, z's probes too (attention to z, patching z, random z)."""
        return SELECTOR_STUDY if task in SELECTOR_VARIANTS else PLAIN_STUDY

    def build(self, model: Any):
        from phaselens.tasks.disambiguation import DisambiguationTask

        return DisambiguationTask(self, n_ctx=model.n_ctx, d_vocab=model.d_vocab)

    def seq_len(self) -> int:
        """Tokens per sequence: BOS, input, SEP, [z, SEP,] output, EOS."""
        inner = self.b_len + self.a_len + 3
        return inner + (self.z_len + 1 if self.task in SELECTOR_VARIANTS else 0)

    def validate(self, model: Any) -> None:
        """Refuse impossible options before anything is drawn (the message names the key)."""
        for key in ("k", "n_unique_b", "b_len", "a_len", "z_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.k > len(ALPHABET) ** self.z_len:
            raise ConfigError(f"data.k={self.k}: only {len(ALPHABET) ** self.z_len} distinct selectors of data.z_len={self.z_len}")
        if self.shared_first_chars and not self.enforce_unique_a_first_char_per_b:
            raise ConfigError("data.shared_first_chars=true needs data.enforce_unique_a_first_char_per_b=true "
                              "(each base orders the same K distinct characters)")
        if self.enforce_unique_a_first_char_per_b and self.k > len(ALPHABET):
            raise ConfigError(f"data.k={self.k} > {len(ALPHABET)} first characters: set "
                              "data.enforce_unique_a_first_char_per_b=false or lower data.k")
        if self.n_unique_b > len(ALPHABET) ** self.b_len // 2:
            raise ConfigError(f"data.n_unique_b={self.n_unique_b} is too many distinct bases of data.b_len={self.b_len}")
        if self.n_unique_b * self.k > len(ALPHABET) ** self.a_len // 4:
            raise ConfigError(f"data.n_unique_b·data.k={self.n_unique_b * self.k} targets cannot be distinct "
                              f"strings of data.a_len={self.a_len}; raise data.a_len")
        if not 0 <= self.probe_fraction < 1:
            raise ConfigError(f"data.probe_fraction must be in [0, 1), got {self.probe_fraction}")
        if self.probe_fraction > 0:
            held = int(round(self.probe_fraction * (self.n_unique_b if self.split_by_base else self.n_unique_b * self.k)))
            if held < 1:
                raise ConfigError(f"data.probe_fraction={self.probe_fraction} holds out nothing; raise it or set it to 0")
        if getattr(model, "d_vocab", VOCAB) < VOCAB:
            raise ConfigError(f"model.d_vocab={model.d_vocab}: the {self.task} task needs d_vocab >= {VOCAB} "
                              "(36 characters plus PAD, BOS, EOS, SEP)")
        if getattr(model, "n_ctx", 0) < self.seq_len():
            raise ConfigError(f"model.n_ctx={model.n_ctx}: {self.task} sequences have {self.seq_len()} tokens; "
                              f"set model.n_ctx >= {self.seq_len()}")
        super().validate(model)
