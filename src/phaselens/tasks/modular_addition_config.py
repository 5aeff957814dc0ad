"""The `data` section of modular addition, the grokking task (torch-free; the task lives in `modular_addition`).

Inputs `a b =` over Z_p (tokens 0…p−1 are the numbers, p is `=`, as in Nanda et al. 2023) and the
answer (a + b) mod p predicted at the `=` position. A fixed share of the p² pairs, drawn once from
`data.seed`, is the training set; the other pairs are the held-out (eval) set. The splits are fixed
sets, so a size of 0 means a whole split: `train.batch_size=0` trains on every training pair at
each step (full batch), `data.eval_size=0` evaluates on every held-out pair, and `data.probe_size=0`
measures checkpoints on all p² pairs, which the `grokking` probe needs for its Fourier measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from phaselens.errors import ConfigError
from phaselens.tasks.config import DataConfig, register_task
from phaselens.tasks.study import Axis, Headline, Study

SEQ_LEN = 4  # a b = c: the model reads `a b =` and predicts c at the `=` position


@register_task("modular_addition")
@dataclass
class ModularAdditionData(DataConfig):
    """(a + b) mod p from `a b =`; a `train_fraction` of the p² pairs trains, the rest is held out."""

    task: str = "modular_addition"
    p: int = 113  # the modulus: odd (the Fourier measures need it), prime as in the paper
    train_fraction: float = 0.3  # share of the p² pairs in the training set
    seed: int = 0  # draws the training pairs once, so every split and run with this seed sees the same ones
    probe_size: int = 0  # 0: every pair (the grokking probe needs the whole grid)
    eval_size: int = 0  # 0: every held-out pair

    fixed_splits: ClassVar[bool] = True
    # position sets: `answer` (the prediction of c), `train_pairs` (that prediction, on training pairs only) and
    # `operand` (the token b); circuits pairs: b changed to another row's b, metric = answer loss
    # compare: the grokking step against lr·weight decay (the rate weight decay shrinks the weights at)
    # and the training fraction
    study: ClassVar[Study] = Study(
        live_probes=("loss", "grokking"),
        post_hoc_probes=("loss", "grokking"),
        probe_options={"grokking": {"answer": "answer", "train": "train_pairs"},
                       "circuits": {"patch": "operand", "read": "answer", "corrupt": "rolled", "rows": 64}},
        position_sets=("answer", "train_pairs", "operand"),
        inapplicable_probes={
            "heads": "the head scores need long sequences of random tokens with repeats; modular addition has 4 tokens",
        },
        headline=Headline(
            "grokking", "tau", description="τ = first step where test accuracy is at least 0.95",
            axes=(Axis("lr·wd", ("train.lr", "train.weight_decay"), description="learning rate × weight decay"),
                  Axis("train_fraction", ("data.train_fraction",), description="share of the pairs trained on")),
        ),
    )

    def build(self, model: Any):
        from phaselens.tasks.modular_addition import ModularAdditionTask

        return ModularAdditionTask(p=self.p, train_fraction=self.train_fraction, seed=self.seed)

    def n_train(self) -> int:
        return round(self.train_fraction * self.p * self.p)

    def validate(self, model: Any) -> None:
        """Refuse impossible options before anything is drawn (the message names the key)."""
        if self.p < 3 or self.p % 2 == 0:
            raise ConfigError(f"data.p must be an odd number >= 3 (the Fourier basis over Z_p needs it), got {self.p}")
        if not 0 < self.train_fraction < 1:
            raise ConfigError(f"data.train_fraction must be in (0, 1), got {self.train_fraction}")
        if not 1 <= self.n_train() < self.p * self.p:
            raise ConfigError(f"data.train_fraction={self.train_fraction} of {self.p * self.p} pairs leaves "
                              f"{'no training' if self.n_train() < 1 else 'no held-out'} pair")
        if getattr(model, "d_vocab", 0) < self.p + 1:
            raise ConfigError(f"model.d_vocab={getattr(model, 'd_vocab', None)}: modular addition over p={self.p} needs "
                              f"d_vocab >= {self.p + 1} (the numbers and `=`)")
        if getattr(model, "n_ctx", 0) < SEQ_LEN:
            raise ConfigError(f"model.n_ctx={getattr(model, 'n_ctx', None)}: modular addition sequences `a b = c` "
                              f"have {SEQ_LEN} tokens; set model.n_ctx >= {SEQ_LEN}")
        super().validate(model)
