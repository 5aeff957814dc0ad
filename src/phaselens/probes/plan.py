"""The measurement plan: the one place that decides what is measured on a run, with what, on which batch.

Probes declare what they need (`Probe.needs`: model parts, position options, batch, run files, live
capability); model configs and adapters declare what a model offers (`ModelSpec.offers`,
`ModelAdapter.offers`); a task's study declares its position sets, default probes and options. The plan
reads those declarations and nothing else:

    plan = plan_probes(PlanContext.of(config), "post_hoc", ["heads", "geometry"], given={"heads": {}})
    plan.require("--probes")          # refuses, with each probe's reason, what cannot be measured
    for probe in plan.probes: probe.name, probe.options, probe.batch, probe.run_files

Four decisions live here and only here:
- options (`merge_options`): the study's defaults, then the run's `telemetry.probe_options`, then what
  this command was given (`--probe-option`, a sweep, a Python call), key by key; checked by building
  the probe, so a bad value fails before anything loads;
- applicability (`refusal`): a probe is refused, with the reason, when the model lacks a part it
  reads, when it is measured live but only runs on checkpoints, when the study says its batches cannot
  feed it, or when a position option is unset or names a set the batch it reads does not have;
- batches (`route`): "training" live; at checkpoints and post-hoc the batch the study routes the probe to,
  else the one the probe asks for, where the run keeps it ("induction" falls back to the probe batch);
- run files (`PlannedProbe.run_files`): the files the run must hold first (the writers are `run_files`).

Config validation, the trainer, `phaselens probe`, sweeps, the server and `llc-calibrate` all ask it.
Torch-free, like the configs it reads.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from phaselens.errors import ConfigError
from phaselens.models.config import MODEL_PARTS
from phaselens.tasks.study import GENERIC, INDUCTION_MIN_LEN, INDUCTION_SETS, Study

MODES = ("live", "checkpoint", "post_hoc")  # every training step / a checkpoint while training / `phaselens probe`
TRAINING_BATCH = "training"  # live probes read rows of the training batch itself
PREDICTION_SET_ALL = "loss"  # a position option naming the loss mask itself, which every batch has


@dataclass(frozen=True)
class PlanContext:
    """What the plan reads about a run: its study, what its model offers, and its configured options.

    induction_batch: whether the run keeps (or can write) an induction batch beside its probe batch.
    """

    study: Study = GENERIC
    offers: frozenset[str] = frozenset(MODEL_PARTS)
    model_kind: str = "transformer"
    lacks_hint: str = ""  # what the model's kind suggests instead, after a refusal for a missing part
    configured: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # telemetry.probe_options
    induction_batch: bool = False
    geometry_every: int = 1  # live only: the geometry probe's cadence (`telemetry.geometry_every`)
    task: str = ""

    @classmethod
    def of(cls, config: Any) -> "PlanContext":
        """The context of a `RunConfig` (anything with `.study`, `.model`, `.data`, `.telemetry`)."""
        study = config.study
        n_ctx = int(getattr(config.model, "n_ctx", 0) or 0)
        return cls(study=study, offers=config.model.offers(), model_kind=config.model.kind,
                   lacks_hint=config.model.lacks_hint(), configured=dict(config.telemetry.probe_options or {}),
                   induction_batch=study.induction_batch and n_ctx >= INDUCTION_MIN_LEN,
                   geometry_every=config.telemetry.geometry_every, task=config.data.task)


@dataclass(frozen=True)
class PlannedProbe:
    """One probe the plan measures: its merged options, the batch it reads and the run files it needs."""

    name: str
    options: dict[str, Any]
    batch: str  # "training" (live), "probe" or "induction"
    run_files: tuple[str, ...] = ()

    def make(self):
        """The probe instance."""
        from phaselens.probes.base import make_probe

        return make_probe(self.name, **self.options)


@dataclass(frozen=True)
class Refusal:
    name: str
    reason: str


@dataclass
class MeasurementPlan:
    """What a command measures (`probes`) and what it cannot (`refused`, each with its reason)."""

    mode: str
    probes: list[PlannedProbe]
    refused: list[Refusal]
    explicit: bool  # the probes were named (refusals are errors), not a study's defaults (refusals are left out)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.probes]

    @property
    def options(self) -> dict[str, dict[str, Any]]:
        return {p.name: p.options for p in self.probes}

    @property
    def routes(self) -> dict[str, str]:
        """Probe name -> the run batch it reads."""
        return {p.name: p.batch for p in self.probes}

    @property
    def run_files(self) -> list[str]:
        """The run files to create before measuring, each once, in a fixed order."""
        return sorted({f for p in self.probes for f in p.run_files})

    def require(self, where: str = "") -> "MeasurementPlan":
        """Raise ConfigError naming every refused probe with its reason (only for named probes); else self."""
        if self.refused and self.explicit:
            prefix = f"{where}: " if where else ""
            raise ConfigError(prefix + "; ".join(r.reason for r in self.refused))
        return self


def default_probes(study: Study, mode: str) -> tuple[str, ...]:
    """The probes a study measures when none are named: live and at checkpoints its live set, post-hoc its post-hoc set."""
    return study.post_hoc_probes if mode == "post_hoc" else study.live_probes


def merge_options(context: PlanContext, name: str, given: Mapping[str, Any] | None = None, mode: str = "post_hoc") -> dict[str, Any]:
    """The options of probe `name`: the study's defaults, then the run's configured ones, then `given`, key by key.

    Live, the geometry probe measures every `telemetry.geometry_every` steps unless its options say otherwise.
    """
    merged = {**context.study.probe_options.get(name, {}), **(context.configured.get(name) or {}), **(given or {})}
    if mode == "live" and name == "geometry" and "every" not in merged:
        merged = {"every": context.geometry_every, **merged}
    return merged


def route(context: PlanContext, probe_class: type, mode: str) -> str:
    """The batch a probe reads: the training batch live (except a probe measured on a copy of the weights,
    `Probe.live_on_copy`); else the study's routing, then the probe's own `Needs.batch`, where the run keeps
    that batch (the probe batch otherwise)."""
    if mode == "live" and not probe_class.live_on_copy:
        return TRAINING_BATCH
    wanted = context.study.reads_batch.get(probe_class.name, probe_class.needs.batch)
    return wanted if wanted == "probe" or (wanted == "induction" and context.induction_batch) else "probe"


def model_refusal(probe: Any, offers: frozenset[str], kind: str, mode: str, hint: str = "") -> str | None:
    """Why a model of `kind` offering `offers` cannot run `probe` in `mode` (a part it lacks, or live and
    checkpoint-only); None if it can. `pl.Telemetry` asks this of any model, the plan of a run's."""
    name, needs = probe.name, probe.needs
    missing = sorted(needs.parts - offers)
    if missing:
        what = " and ".join(MODEL_PARTS[part] for part in missing)
        return f"probe {name!r} reads {what}, which model.kind={kind} does not have" + (f"; {hint}" if hint else "")
    if mode == "live" and not needs.live:
        return f"probe {name!r} runs on checkpoints only (telemetry.checkpoint_probes, or phaselens probe RUN --probes {name})"
    return None


def refusal(context: PlanContext, probe: Any, mode: str, batch: str) -> str | None:
    """Why `probe` (an instance with its merged options) cannot be measured in `mode` on this run; None if it can."""
    name, needs = probe.name, probe.needs
    refused = model_refusal(probe, context.offers, context.model_kind, mode, context.lacks_hint)
    if refused:
        return refused
    declared = context.study.inapplicable_probes.get(name)
    if declared:
        return f"probe {name!r} does not apply to a {context.task or 'this'!r} run: {declared}"
    sets = INDUCTION_SETS if batch == "induction" else context.study.position_sets
    have = "unknown" if sets is None else ", ".join(sets) or "none"
    for option in (*needs.position_options, *needs.optional_sets):
        value = probe.options.get(option)
        if value is None or value == "":
            if option in needs.position_options:
                return (f"probe {name!r} reads the position sets its options {' and '.join(needs.position_options)} name, "
                        f"and this task declares none for it (its batches have: {have}); set them with "
                        f"--probe-option {name}.{option}=SET")
            continue
        if sets is None:  # a study that does not declare its sets: the batch says when the probe measures
            continue
        names = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []
        absent = [n for n in names if n != PREDICTION_SET_ALL and n not in sets]
        if absent:
            return (f"probe {name!r} option {option} names the position set {absent[0]!r}, which this run's {batch} batch "
                    f"does not have (it has: {have})")
    return None


def plan_probes(context: PlanContext, mode: str, names: Sequence[str] | None = None,
                given: Mapping[str, Mapping[str, Any]] | None = None) -> MeasurementPlan:
    """The plan for measuring `names` (default: the study's probes for `mode`) with `given` options on top.

    Unknown probes, options for probes not measured and options a probe refuses are ConfigErrors here;
    inapplicable probes are listed in `refused` (`MeasurementPlan.require` makes them errors).
    """
    from phaselens.probes.base import make_probe, probe_class, probe_names

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    registered = probe_names()
    explicit = names is not None  # named probes (none at all: an empty plan), else the study's defaults
    wanted = list(dict.fromkeys(names)) if explicit else [p for p in default_probes(context.study, mode) if p in registered]
    unknown = [n for n in wanted if n not in registered]
    if unknown:
        raise ConfigError(f"unknown probe(s) {unknown}; registered probes: {', '.join(registered)}")
    extra = sorted(set(given or {}) - set(wanted))
    if extra:
        raise ConfigError(f"probe option(s) for {extra}, which this sweep does not measure (it measures {', '.join(wanted)})")
    planned, refused = [], []
    for name in wanted:
        options = merge_options(context, name, (given or {}).get(name), mode)
        problem = option_problem(probe_class(name), options)
        if problem:
            raise ConfigError(f"probe {name!r} with options {_text(options)}: {problem}")
        try:
            probe = make_probe(name, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"probe {name!r} with options {_text(options)}: {exc}") from None
        batch = route(context, type(probe), mode)
        reason = refusal(context, probe, mode, batch)
        if reason:
            refused.append(Refusal(name, reason))
            continue
        files = tuple(probe.needs.run_files) + (("induction_batch",) if batch == "induction" else ())
        planned.append(PlannedProbe(name, options, batch, files))
    return MeasurementPlan(mode, planned, refused, explicit)


def option_problem(probe_class: type, options: Mapping[str, Any]) -> str | None:
    """Why `options` do not fit what `probe_class` accepts (an option it does not have, a value not of the type
    its __init__ declares); None if they fit. Checked once, here, for every probe and every source of options."""
    parameters = inspect.signature(probe_class.__init__).parameters
    named = [p.name for p in parameters.values() if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    known = probe_class.option_names if probe_class.option_names is not None else (None if takes_any else named)
    if known is not None:
        unknown = sorted(set(options) - set(known))
        if unknown:
            return f"unknown option(s) {unknown}; its options: {', '.join(known) or 'none'}"
    try:
        hints = typing.get_type_hints(probe_class.__init__)
    except Exception:  # an annotation that does not resolve (a plug-in's): its probe checks its own values
        hints = {}
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            return f"option {key}={value!r} must be {_type_text(hints[key])}"
    return None


def _fits(value: Any, kind: Any) -> bool:
    """Whether an option value (as YAML or a Python call gives it) is of the annotated type `kind`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin is typing.Union or (origin is not None and type(kind).__name__ == "UnionType"):
        return any(_fits(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if kind is Path:
        return isinstance(value, (str, Path))
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    return True  # a type YAML cannot give (a tensor): only Python callers pass it, and the probe checks it


def _type_text(kind: Any) -> str:
    """`kind` as a user reads it: "true or false", "a finite number", "a name or a list of indices"."""
    words = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a name",
             type(None): "unset", Path: "a path"}
    if kind in words:
        return words[kind]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_type_text(args[0]).removeprefix('a ')}s" if args else "a list"
    if args:
        return " or ".join(_type_text(arg) for arg in args)
    return getattr(kind, "__name__", str(kind))


def canonical_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON gives them back, whole numbers as floats (gamma=300 and gamma=300.0 are one setting)."""
    return json.loads(json.dumps(options, sort_keys=True), parse_int=float)


def _text(options: Mapping[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=str) if options else "the defaults"
