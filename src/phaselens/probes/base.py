"""The probe interface: one class per probe, run live inside training and post-hoc on checkpoints.

A probe names the hook points it reads and turns those activations (on a task batch) into
`Measurement`s: a metric name and a tensor of shape (), (n_layers,) or (n_layers, n_heads).
Reductions stay on the model's device; turning them into rows is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from phaselens.models.adapter import ModelAdapter, adapter_for
from phaselens.tasks.batch import TaskBatch


@dataclass(frozen=True)
class Measurement:
    """One metric's values: shape () per model, (L,) per layer, (L, H) per layer and head."""

    metric: str
    value: torch.Tensor


@dataclass
class ProbeInputs:
    """What a probe sees: the activations it asked for, and the batch they came from."""

    acts: Mapping[str, torch.Tensor]  # hook name -> activation, rows of `batch` only
    batch: TaskBatch
    model: Any  # the model itself; probes read it through `adapter`
    logits: torch.Tensor | None = None  # (B, T, vocab), when the probe sets needs_logits
    n_layers: int = 0
    n_heads: int = 0
    _stacked: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _rolled: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _predictions: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _adapter: ModelAdapter | None = field(default=None, repr=False)

    @property
    def adapter(self) -> ModelAdapter:
        """The model as probes see it: dimensions, residual sites, unembedding, fast paths (`models.adapter`)."""
        if self._adapter is None:
            self._adapter = adapter_for(self.model)
        return self._adapter

    def stack(self, template: str) -> torch.Tensor:
        """Stack one hook over layers: `stack("blocks.{}.attn.hook_pattern")` -> (L, ...).

        Computed once per inputs and shared by the probes that ask for the same hook.
        """
        if template not in self._stacked:
            self._stacked[template] = torch.stack([self.acts[template.format(layer)] for layer in range(self.n_layers)])
        return self._stacked[template]

    def next_token_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p, p) of the model's next-token predictions, (B, T-1, V) each in float32.

        Computed once per inputs and shared by the probes that read the model's own softmax (the
        loss, the KL to the unigram, the logit lens' last layer): one log-softmax and one exp in all.
        """
        if self._predictions is None:
            assert self.logits is not None, "next-token probabilities need the logits (a probe that reads them sets needs_logits)"
            log_probs = self.logits[:, :-1].float().log_softmax(-1)
            self._predictions = (log_probs, log_probs.exp())
        return self._predictions

    def rolled_logits(self, name: str, reader: str) -> torch.Tensor:
        """Logits (B, T, V) of the batch with token set `name` moved one row on (`TaskBatch.rolled`).

        One no-grad forward per set, shared by the probes that read it (the z-shuffled loss and random z).
        """
        if name not in self._rolled:
            with torch.no_grad():
                self._rolled[name] = self.adapter.logits(self.batch.rolled(name, reader))
        return self._rolled[name]


@dataclass(frozen=True)
class Needs:
    """What a probe needs in order to measure, as data: the measurement plan (`probes.plan`) reads it.

    parts: model parts it reads beyond residual streams and logits (names of `models.config.MODEL_PARTS`,
        e.g. "attention_patterns"); a model that does not offer one of them cannot run the probe.
    position_options: its options that name position sets of the batch it reads (`TaskBatch.positions`);
        each must be set (by the task's study or the user) to a set that batch has.
    optional_sets: options that may name position sets of that batch, or be left unset.
    batch: the run batch it measures at checkpoints and post-hoc: "probe", the task's own batch, or
        "induction", random tokens with a segment repeated at a variable offset (a study may route it
        elsewhere, `Study.reads_batch`).
    run_files: files the run must hold before it measures (`run_files.RUN_FILES`: "unigram", "training_sample").
    live: False for probes too costly for every training step (extra forwards, an unembedding per layer):
        they run at checkpoints (`telemetry.checkpoint_probes`) and in `phaselens probe` only.
    """

    parts: frozenset[str] = frozenset()
    position_options: tuple[str, ...] = ()
    optional_sets: tuple[str, ...] = ()
    batch: str = "probe"
    run_files: tuple[str, ...] = ()
    live: bool = True


class Probe:
    """Base class. Subclass, set `name` and `needs`, list `hook_names`, implement `compute`, then `@register_probe`."""

    name: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()
    needs_logits: ClassVar[bool] = False
    # True when `compute` uses `inputs.logits` if they are there (it saves work), though it can do without;
    # a batch none of whose probes needs or uses logits is measured by a forward that stops at its last hook point.
    uses_logits: ClassVar[bool] = False
    # True when `compute` reads only `inputs.acts`, `inputs.logits` and `inputs.batch`, never the
    # model: live telemetry may then measure it on a spare core while the optimizer updates the weights.
    off_thread: ClassVar[bool] = False
    every: int = 1  # live telemetry measures this probe only at steps that are a multiple of it
    # True when `compute` runs its own forwards (and backwards) on the model instead of reading the training
    # forward's activations (circuits): live telemetry measures it at its cadence on a copy of the weights taken
    # at that step, in eval mode, outside the training step's autograd and RNG, so training is unchanged
    # (`probes.live`); the plan routes it to the batch it reads at checkpoints, not the training batch.
    live_on_copy: ClassVar[bool] = False
    # True when training writes the probe's artifact at every checkpoint it measures there (small
    # artifacts a report reads, such as the grokking probe's key frequencies); else only `phaselens probe` does.
    checkpoint_artifacts: ClassVar[bool] = False
    # The options a probe whose __init__ takes **options accepts (the plan refuses any other, `probes.plan`);
    # None: the keyword parameters of its __init__ (a plug-in taking **options then accepts any).
    option_names: ClassVar[tuple[str, ...] | None] = None
    options: dict[str, Any]

    def __init__(self, **options: Any):
        self.options = options

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        """The hook points of `adapter`'s model whose activations `compute` reads."""
        return []

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        raise NotImplementedError

    def runs_off_thread(self, batch: Any) -> bool:
        """Whether this probe may be measured on `batch` away from the training thread (see `off_thread`)."""
        return self.off_thread

    def bind_run(self, run_dir: Any) -> None:
        """Read run-level data the probe needs (e.g. token counts) before it measures that run."""

    def artifact(self, inputs: ProbeInputs) -> dict[str, Any] | None:
        """Optional non-scalar result (JSON-able), written to artifacts/<probe>/ by post-hoc sweeps."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})" if self.options else f"{type(self).__name__}()"


_REGISTRY: dict[str, type[Probe]] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator: make a probe available by its `name` (to the trainer, CLI and config); a second
    class under a taken name is refused, naming both (`phaselens.registry`)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    from phaselens.registry import register

    return register(_REGISTRY, cls.name, cls, "probe")


def _load_builtin() -> None:
    from phaselens.plugins import load_package

    load_package("phaselens.probes")  # every probe module registers its probes


def probe_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def probe_class(name: str) -> type[Probe]:
    """The class registered under `name` (ConfigError naming the registered ones if there is none)."""
    _load_builtin()
    if name not in _REGISTRY:
        from phaselens.errors import ConfigError

        raise ConfigError(f"unknown probe {name!r}; registered probes: {', '.join(probe_names())}")
    return _REGISTRY[name]


def make_probe(name: str | Probe, **options: Any) -> Probe:
    """A probe instance from its registered name (or pass an instance through)."""
    if isinstance(name, Probe):
        return name
    _load_builtin()
    if name not in _REGISTRY:
        from phaselens.errors import ConfigError

        raise ConfigError(f"unknown probe {name!r}; registered probes: {', '.join(probe_names())}")
    return _REGISTRY[name](**options)


@dataclass
class Layout:
    """How a probe's flattened measurements map back to (probe, metric, layer, head) rows."""

    keys: list[tuple[str, str, int | None, int | None]] = field(default_factory=list)

    @classmethod
    def of(cls, probe: str, measurements: list[Measurement]) -> "Layout":
        keys: list[tuple[str, str, int | None, int | None]] = []
        for m in measurements:
            v = m.value
            if v.dim() == 0:
                keys.append((probe, m.metric, None, None))
            elif v.dim() == 1:
                keys += [(probe, m.metric, layer, None) for layer in range(v.shape[0])]
            elif v.dim() == 2:
                keys += [(probe, m.metric, layer, head) for layer in range(v.shape[0]) for head in range(v.shape[1])]
            else:
                raise ValueError(f"probe {probe!r} metric {m.metric!r}: value of shape {tuple(v.shape)}; use (), (L,) or (L, H)")
        return cls(keys)


def to_rows(step: int, source: str, results: list[tuple[str, list[Measurement]]]) -> list[tuple]:
    """Rows (step, probe, metric, layer, head, value, source) from probes' measurements (one CPU copy)."""
    results = [(probe, ms) for probe, ms in results if ms]
    if not results:
        return []
    values = flatten([m for _, ms in results for m in ms]).cpu().tolist()
    keys = [k for probe, ms in results for k in Layout.of(probe, ms).keys]
    return [(step, probe, metric, layer, head, value, source) for (probe, metric, layer, head), value in zip(keys, values)]


def flatten(measurements: list[Measurement]) -> torch.Tensor:
    """All values of a probe's measurements as one float32 vector (stays on device; always a copy)."""
    return torch.cat([m.value if m.value.dim() == 1 else m.value.reshape(-1) for m in measurements]).detach().float()
