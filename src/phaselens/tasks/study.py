"""What a task declares so that nothing above it branches on the task: a study, as a plug-in.

A task's `DataConfig` subclass returns a `Study` from `study_for(task)`: the named position sets its
batches have (`TaskBatch.positions`), the probes measured by default (live and post-hoc), the options
those probes read the position sets with, which of the run's batches a probe reads where the probe's
own `Needs.batch` is not it, the probes its batches cannot feed for a reason no probe declares, and
the headline `compare` fits. The measurement plan (`phaselens.probes.plan`) reads all of it.
The report layer looks up the report section registered for the task's name
(`phaselens.report.register_study`); a task without one gets the generic report.
Torch-free: configs validate before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

LIVE_PROBES = ("attention", "heads", "loss")  # measured on the training forward every telemetry.every steps
POST_HOC_PROBES = ("attention", "heads", "loss", "logit_lens")  # read no position set: they fit any task
INDUCTION_SETS = ("copy", "source")  # the position sets of an induction batch (`tasks.induction.induction_probe_batch`)
INDUCTION_MIN_LEN = 4  # the shortest sequence an induction batch fits: a segment of two tokens and its repeat


@dataclass(frozen=True)
class Axis:
    """A quantity `compare` fits the headline against: a product of config values over a product of others.

    `Axis("D", ("data.n_unique_b", "data.k"))` is D = n_unique_b·K; `Axis("T", ("train.lr",), ("train.batch_size",))`
    is lr / batch size.
    """

    name: str
    times: tuple[str, ...]
    over: tuple[str, ...] = ()
    description: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.times, *self.over)

    def value(self, config: Mapping[str, Any]) -> float | None:
        """The axis value from a flat config (dotted keys); None when a key is missing or not a number."""
        try:
            value = 1.0
            for key in self.times:
                value *= float(config[key])
            for key in self.over:
                value /= float(config[key])
            return value
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None


@dataclass(frozen=True)
class Headline:
    """The number a study's runs are compared by, and the axes its question is asked on.

    `name` picks the analysis that computes it from a run (`phaselens.analysis.headlines`); `compare`
    fits log `metric` = a + Σ b_i log x_i jointly over the `axes` that vary between the runs.
    """

    name: str
    metric: str = "tau"
    description: str = ""
    axes: tuple[Axis, ...] = ()


@dataclass(frozen=True)
class Phenomenon:
    """Which change of which series is the study's phenomenon: its headline transitions.

    The report, the alignment table, `compare`'s step columns and the dashboard mark these
    (`signals.transitions.headline_transitions`), never simply the strongest change of the series, which
    can be another one (late disambiguation: the descent *to* the log K plateau is stronger than the
    drop *from* it).

    probe, metric: the per-model series; direction: "fall" or "rise".
    min_change: the least |after − before| in the metric's units (induction: 0.5 nats of copy loss).
    leaves_log_of: a dotted config key K; the change leaves the level log K: it starts nearer that level
    than it ends, and ends beyond `LEAVE_TOLERANCE` of it on the far side (the drop from the plateau).
    """

    probe: str
    metric: str
    direction: str = "fall"
    min_change: float = 0.0
    leaves_log_of: str | None = None
    description: str = ""


LEAVE_TOLERANCE = 0.15  # a change has left a level once it is more than 15% of the level past it


@dataclass(frozen=True)
class Study:
    """A task's defaults and declarations (see the module docstring).

    position_sets: the named position sets of the task's probe batch (induction: copy, source); a probe's
    position options must name one of them (or of the induction batch's, `INDUCTION_SETS`, for a probe
    that reads that batch).
    probe_options: per probe, the options that make it read this task's position sets, e.g.
    {"attention_to": {"query": "copy", "key": "source"}}; telemetry.probe_options and
    `--probe-option` override them key by key.
    inapplicable_probes: probe name -> why this task's batches cannot feed it, where the probe's needs
    do not already say so (a probe whose position options have no default here is refused by the plan).
    induction_batch: the task's batches have no segment repeated at a variable offset (text, late
    disambiguation), so its runs store an induction batch beside the probe batch, in the model's own
    vocabulary, for the probes that read "induction" (`batch_for`); such a task offers
    `model_tokenizer(d_vocab)`, the tokenizer whose ordinary ids the batch is drawn from (or, like a
    Trainer run's, cannot be built, and whoever writes the run writes the batch).
    reads_batch: per probe, the run batch it measures at checkpoints and post-hoc ("probe" or
    "induction"), over the probe class's `reads_batch`; e.g. late disambiguation keeps attention_to and
    patching on its own batch (its z positions) while heads reads the induction batch.
    """

    position_sets: tuple[str, ...] | None = None  # None: not declared (names are then checked when measured)
    live_probes: tuple[str, ...] = LIVE_PROBES
    post_hoc_probes: tuple[str, ...] = POST_HOC_PROBES
    probe_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    inapplicable_probes: Mapping[str, str] = field(default_factory=dict)
    induction_batch: bool = False
    reads_batch: Mapping[str, str] = field(default_factory=dict)
    headline: Headline | None = None  # what `compare` reports and fits; None: compare has nothing to fit
    phenomenon: Phenomenon | None = None  # which change of which series the study is about (its headline transitions)



GENERIC = Study()  # a task that declares nothing: probes that read no position set, the generic report
