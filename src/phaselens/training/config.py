"""Run configuration: typed dataclasses, loaded from a preset or YAML file plus dotted overrides.

Everything is checked before training starts: unknown keys, wrong types and impossible shapes
raise `ConfigError` naming the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from phaselens.errors import ConfigError
from phaselens.models.config import ModelConfig, ModelSpec
from phaselens.models.device import check_device
from phaselens.tasks.config import DataConfig
from phaselens.tasks.induction_config import InductionData

if TYPE_CHECKING:  # for annotations only
    from phaselens.probes.plan import MeasurementPlan
    from phaselens.tasks.study import Study

SCHEDULES = ("constant", "cosine")
SEED_LIMIT = 2**32  # seeds are below this: torch's generators take 64 bits, and seeds plus their offsets stay inside
MAX_NAME_BYTES = 255  # a run's name becomes a directory name, which file systems limit to 255 bytes


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32  # 0: full batch, every step trains on the whole training split (tasks with fixed splits)
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "constant"  # or "cosine": linear warmup then cosine decay to min_lr_ratio·lr
    warmup: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 100
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps (`phaselens.models.device`)
    threads: int = 0  # CPU threads for torch (0: torch's default); tiny models run best on 1


@dataclass
class TelemetryConfig:
    every: int = 1
    probes: list[str] | None = None  # live probes; None: the ones the task declares (attention, heads, loss)
    rows: int = 8  # live probes read this many sequences of each training batch (0: all)
    flush_every: int = 100
    geometry_every: int = 10  # the `geometry` probe, when listed, measures live every this many steps
    checkpoint_probes: list[str] = field(default_factory=list)  # measured on the probe batch at checkpoints only
    background: bool = True  # measure on a spare CPU core while the step goes on (when the model is on the CPU and a core is free)
    # probe name -> options, over the ones the task declares (`telemetry.probe_options.logit_lens.first_token_only=true`);
    # they hold live, at checkpoints and in `phaselens probe`
    probe_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a TensorBoard log directory that live and checkpoint values are mirrored to while training (needs `tensorboard`)
    tensorboard: str | None = None


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelSpec = field(default_factory=ModelConfig)  # `model.kind` picks the architecture
    data: DataConfig = field(default_factory=InductionData)  # `data.task` picks the task and its options
    train: TrainConfig = field(default_factory=TrainConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        # None: the study's live probes, less those the model cannot run (`validate` leaves those out)
        self._default_live = self.telemetry.probes is None
        if self._default_live:
            self.telemetry.probes = list(self.study.live_probes)

    @property
    def study(self) -> Study:
        """What the run's task declares (default probes and their options); see `phaselens.tasks.study`."""
        return type(self.data).study_for(self.data.task)

    def plan(self, mode: str, names: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None,
             induction_batch: bool | None = None) -> MeasurementPlan:
        """The measurement plan (`phaselens.probes.plan`) of this run for `mode` (live | checkpoint | post_hoc):
        `names` (default: the study's) with the task's, the config's and then `options`' options;
        `induction_batch`: whether the run has an induction batch (default: where its study keeps one)."""
        from dataclasses import replace

        from phaselens.probes.plan import PlanContext, plan_probes

        context = PlanContext.of(self)
        if induction_batch is not None:
            context = replace(context, induction_batch=induction_batch)
        return plan_probes(context, mode, names, options)

    def live_plan(self) -> MeasurementPlan:
        """What training measures every `telemetry.every` steps."""
        return self.plan("live", self.telemetry.probes)

    def checkpoint_plan(self, induction_batch: bool | None = None) -> MeasurementPlan:
        """What training measures at each checkpoint on the run's fixed batches: the live probes and the checkpoint-only ones."""
        tel = self.telemetry
        return self.plan("checkpoint", list(dict.fromkeys([*(tel.probes or []), *tel.checkpoint_probes])), induction_batch=induction_batch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Refuse impossible settings before anything is built; messages name the key."""
        self.model.validate()
        t, d, tel = self.train, self.data, self.telemetry
        positive = {
            "train.steps": t.steps, "train.checkpoint_every": t.checkpoint_every,
            "train.eval_every": t.eval_every, "telemetry.every": tel.every, "telemetry.flush_every": tel.flush_every,
            "telemetry.geometry_every": tel.geometry_every,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.batch_size < 0 or (t.batch_size == 0 and not d.fixed_splits):
            raise ConfigError(f"train.batch_size must be >= 1, got {t.batch_size}" + (
                "; 0 (full batch) needs a task with a fixed training set, such as modular_addition, "
                f"and data.task={d.task} draws new examples" if t.batch_size == 0 else ""))
        cores = os.cpu_count() or 1
        if not 0 <= t.threads <= 4 * cores:  # torch starts that many threads: 100,000 exhausts the process
            raise ConfigError(f"train.threads must be between 0 (torch's default) and {4 * cores} (4 x this machine's "
                              f"{cores} cores), got {t.threads}")
        for key, seed in (("train.seed", t.seed), ("data.seed", getattr(d, "seed", 0))):
            if not 0 <= seed < SEED_LIMIT:
                raise ConfigError(f"{key} must be between 0 and {SEED_LIMIT - 1}, got {seed}")
        if tel.rows < 0:
            raise ConfigError(f"telemetry.rows must be >= 0 (0 = the whole batch), got {tel.rows}")
        if tel.tensorboard is not None:
            from phaselens.store.tensorboard import check_log_dir

            check_log_dir(tel.tensorboard, "telemetry.tensorboard")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise ConfigError(f"train.lr must be a finite number > 0, got {t.lr}")
        for key in ("weight_decay", "grad_clip", "warmup"):
            if not (getattr(t, key) >= 0 and math.isfinite(getattr(t, key))):  # NaN compares false both ways
                raise ConfigError(f"train.{key} must be a finite number >= 0, got {getattr(t, key)}")
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\") or Path(self.name).is_absolute():
            raise ConfigError(f"name must be a plain directory name (it becomes runs/<name>), got {self.name!r}")
        if len(self.name.encode()) > MAX_NAME_BYTES:
            raise ConfigError(f"name is {len(self.name.encode())} bytes long; a run's name becomes a directory name, "
                              f"at most {MAX_NAME_BYTES} bytes")
        if t.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
        if not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be in [0, 1), got {getattr(t, key)}")
        check_device(t.device, "train.device")
        d.validate(self.model)
        validate_probe_options(tel.probe_options, "telemetry.probe_options")
        for name in tel.probe_options:  # options of probes measured post-hoc only are checked here too
            try:
                self.plan("post_hoc", [name])
            except ConfigError as exc:
                raise ConfigError(f"telemetry.probe_options.{name}: {exc}") from None
        for key, mode, names in (("telemetry.probes", "live", None if self._default_live else tel.probes),
                                 ("telemetry.checkpoint_probes", "checkpoint", tel.checkpoint_probes)):
            try:
                plan = self.plan(mode, names)
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            plan.require(key)
            if names is None:  # the study's live probes: those this model cannot run are left out
                tel.probes = plan.names

    def build_task(self) -> Any:
        """The task object for `data` (its sequences fill the model's context)."""
        return self.data.build(self.model)


# ---------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("phaselens.presets").iterdir() if p.name.endswith(".yaml"))


def load_config(source: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A validated `RunConfig` from a preset name or YAML path plus `key=value` overrides."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give a YAML file or a preset ({', '.join(preset_names())})")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        origin = str(path)
        text = path.read_text()
    elif str(source) in preset_names():
        origin = f"preset {source!r}"
        text = resources.files("phaselens.presets").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError(f"{source!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem if origin == str(path) else str(source))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    config = from_dict(RunConfig, raw, origin=origin)
    config.validate()
    return config


def validate_probe_options(options: Any, where: str) -> None:
    """`options` must map registered probe names to mappings of option values."""
    from phaselens.probes.base import probe_names

    if not isinstance(options, dict):
        raise ConfigError(f"{where} must map probe names to their options, got {options!r}")
    for name, given in options.items():
        if name not in probe_names():
            raise ConfigError(f"{where}.{name}: unknown probe; registered: {', '.join(probe_names())}")
        if not isinstance(given, dict):
            raise ConfigError(f"{where}.{name} must be a mapping of option: value (e.g. {where}.{name}.OPTION=VALUE), got {given!r}")


def parse_probe_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """`["logit_lens.first_token_only=false"]` -> {"logit_lens": {"first_token_only": False}} (values read as YAML)."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, value = parse_override(item)
        probe, _, option = key.partition(".")
        if not probe or not option or "." in option:
            raise ConfigError(f"probe option {item!r} must look like probe.option=value (e.g. logit_lens.first_token_only=true)")
        options.setdefault(probe, {})[option] = value
    validate_probe_options(options, "--probe-option")
    return options


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", "3e-4"); values are typed later against the dataclass field."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=600)")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, origin: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, refusing unknown keys and wrong types by name."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {where} must be a mapping, got {raw!r}")
    if hasattr(cls, "resolve"):  # a section whose class depends on a key in it (`model.kind`, `data.task`)
        cls = cls.resolve(raw)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"{origin}: unknown config key(s) {keys}; valid keys under {where}: {', '.join(sorted(names))}")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        kind = hints[name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[name] = from_dict(kind, value, origin, key + ".")
        else:
            values[name] = coerce(value, kind, key, origin)
    return cls(**values)


def coerce(value: Any, kind: Any, key: str, origin: str) -> Any:
    """Check (and gently convert: 1e-3 written as a string, 3 for 3.0) one value against its type."""
    def fail() -> ConfigError:
        return ConfigError(f"{origin}: {key} must be {type_name(kind)}, got {value!r} ({type(value).__name__})")

    origin_kind = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # "1e3" (YAML reads exponents without a dot as text)
            try:
                value = float(value)
            except ValueError:
                raise fail() from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if kind is str:
        if isinstance(value, str):
            return value
        raise fail()
    if origin_kind is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail()
        return [coerce(v, item_kind, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if origin_kind in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        for option in typing.get_args(kind):
            if option is type(None):
                continue
            try:
                return coerce(value, option, key, origin)
            except ConfigError:
                pass
        raise fail()
    return value


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts: `train.lr: 0.001 -> 0.003`."""
    found = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {type_name(typing.get_args(kind)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))
