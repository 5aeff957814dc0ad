"""The run record `run.json`: written by the trainer, `phaselens import-hf` and `pl.TelemetryCallback`,
read by everything above the store, through this one typed reader and writer (torch-free).

    RUN/run.json
    {"name": str,                      the run's name (a record without one is named after its directory)
     "status": "running" | "finished" | "failed" | "stopped",   stopped: interrupted (Ctrl-C), resumable
     "imported": {                     only for a checkpoint series whose checkpoints reference model revisions
         "source": str,                a Hub id or a local folder (the Trainer's output_dir for a TelemetryCallback run)
         "local": bool,
         "revisions": {"<step>": revision},
         "device": str, "dtype": str,  `phaselens probe`'s defaults for this series (import-hf only)
         "weights_sha256": {"<step>": hex digest},        see `phaselens.series.integrity`
         "identical": [{"steps": [int], "same_as": int}]} revisions with byte-identical weights
     "trainer": {"output_dir": str, "args": {TrainingArguments}},   a TelemetryCallback run only
     "config": {"name", "model": {...}, "data": {...}, "train", "telemetry", ...},  the resolved config;
                                       `model` and `data` are required (no default may stand in for them)
     "model": {...},                   the model spec (= config.model; `kind` is the architecture)
     "task": {"name": task, ...},      the task spec: the data section (+ seq_len and vocab for a trained run)
     "versions": {package: version},   Python and the libraries that wrote the run
     "device": str,                    the device a trained run ran on
     "steps_done": int,                the last step whose checkpoint and metrics are saved
     "created": str, "finished": str,  local timestamps, ISO 8601
     "stop_reason": str,               why a stopped or failed run stopped
     "posthoc_probe_options": {probe: {option: value}},  the options each probe's checkpoint rows were measured with
     ...}                              any other key: kept as it is (a newer phaselens or a plugin wrote it)

Every key but `config` is optional when read, so an older run.json reads with the defaults above
(`model` and `task` default to what `config` says). Keys this version does not know are kept in
`RunRecord.extra` and written back unchanged, so an update never drops what another writer recorded;
`RunRecord.replace` refuses a field name it does not know, so a misspelt update fails loudly.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from phaselens.errors import RunError
from phaselens.store.atomic import parse_json, write_json

STATUSES = ("running", "finished", "failed", "stopped")  # what a writer may record (a reader accepts any string)


def versions() -> dict[str, str]:
    """The versions of Python and of the libraries that wrote a run (recorded in run.json)."""
    found = {"python": platform.python_version()}
    for package in ("phaselens", "torch", "transformer-lens", "transformers", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def timestamp() -> str:
    """Now, as run.json records `created` and `finished`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class ImportedSeries:
    """Where the checkpoints of an imported series (or a TelemetryCallback run) point to."""

    source: str
    local: bool = False
    revisions: dict[int, str] = field(default_factory=dict)  # step -> revision name
    device: str | None = None
    dtype: str | None = None
    weights_sha256: dict[int, str] = field(default_factory=dict)  # step -> content hash
    identical: list[dict[str, Any]] = field(default_factory=list)  # [{"steps": [...], "same_as": step}]
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "local": self.local,
                               "revisions": {str(s): r for s, r in sorted(self.revisions.items())}}
        if self.device is not None:
            out["device"] = self.device
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.weights_sha256:
            out["weights_sha256"] = {str(s): d for s, d in sorted(self.weights_sha256.items())}
        if self.identical:
            out["identical"] = self.identical
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ImportedSeries":
        data = _mapping(data, f"{where}: 'imported'")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            return cls(source=str(data["source"]), local=bool(data.get("local", False)),
                       revisions={int(s): str(r) for s, r in _mapping(data.get("revisions") or {}, f"{where}: 'imported.revisions'").items()},
                       device=_optional_str(data.get("device")), dtype=_optional_str(data.get("dtype")),
                       weights_sha256={int(s): str(d) for s, d in (data.get("weights_sha256") or {}).items()},
                       identical=[{"steps": [int(s) for s in g["steps"]], "same_as": int(g["same_as"])}
                                  for g in data.get("identical") or []],
                       extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RunError(f"{where}: malformed 'imported' section ({type(exc).__name__}: {exc})") from exc


@dataclass
class TrainerOrigin:
    """The `transformers.Trainer` a TelemetryCallback run was recorded from."""

    output_dir: str
    args: dict[str, Any] = field(default_factory=dict)  # TrainingArguments.to_json_string()

    def to_json(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "args": self.args}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "TrainerOrigin":
        data = _mapping(data, f"{where}: 'trainer'")
        if not isinstance(data.get("output_dir"), str):
            raise RunError(f"{where}: 'trainer.output_dir' must be a string, got {data.get('output_dir')!r}")
        return cls(output_dir=data["output_dir"], args=dict(_mapping(data.get("args") or {}, f"{where}: 'trainer.args'")))


@dataclass
class RunRecord:
    """Everything run.json says about one run (see the module docstring for the file)."""

    status: str
    config: dict[str, Any]
    name: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # empty: config["model"]
    task: dict[str, Any] = field(default_factory=dict)  # empty: {"name": data.task, **config["data"]}
    versions: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    steps_done: int | None = None
    created: str | None = None
    finished: str | None = None
    stop_reason: str | None = None
    imported: ImportedSeries | None = None
    trainer: TrainerOrigin | None = None
    posthoc_probe_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, written back as they were

    def __post_init__(self) -> None:
        if not self.model:
            self.model = dict(self.config.get("model") or {})
        if not self.task:
            data = self.config.get("data") or {}
            self.task = {"name": data["task"], **data} if "task" in data else dict(data)  # the default task: `Run.task`

    def to_json(self) -> dict[str, Any]:
        """The run.json document (optional fields that are unset are left out, as older writers did)."""
        out: dict[str, Any] = {"name": self.name, "status": self.status}
        if self.imported is not None:
            out["imported"] = self.imported.to_json()
        if self.trainer is not None:
            out["trainer"] = self.trainer.to_json()
        out.update(config=self.config, model=self.model, task=self.task, versions=self.versions)
        for key in ("device", "steps_done", "created", "finished", "stop_reason"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.posthoc_probe_options:
            out["posthoc_probe_options"] = self.posthoc_probe_options
        if self.name is None:
            del out["name"]
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "RunRecord":
        """Parse a run.json document; RunError naming `where` and the field at fault."""
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise RunError(f"{where} has no 'config' section")
        missing = [key for key in ("model", "data") if not isinstance(data["config"].get(key), dict)]
        if missing:  # a default would silently stand in for how the run was really trained
            raise RunError(f"{where}: its config has no {' or '.join(repr(k) for k in missing)} section, "
                           "so the run's model and task cannot be known; restore it from a copy of the run")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        status = data.get("status", "unknown")
        if not isinstance(status, str):
            raise RunError(f"{where}: 'status' must be a string, got {status!r}")
        steps = data.get("steps_done")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
            raise RunError(f"{where}: 'steps_done' must be an integer, got {steps!r}")
        return cls(
            name=_optional_str(data.get("name")), status=status, config=data["config"],
            model=dict(_mapping(data.get("model") or {}, f"{where}: 'model'")),
            task=dict(_mapping(data.get("task") or {}, f"{where}: 'task'")),
            versions={str(k): str(v) for k, v in _mapping(data.get("versions") or {}, f"{where}: 'versions'").items()},
            device=_optional_str(data.get("device")), steps_done=steps,
            created=_optional_str(data.get("created")), finished=_optional_str(data.get("finished")),
            stop_reason=_optional_str(data.get("stop_reason")),
            imported=None if data.get("imported") is None else ImportedSeries.from_json(data["imported"], where),
            trainer=None if data.get("trainer") is None else TrainerOrigin.from_json(data["trainer"], where),
            posthoc_probe_options={str(p): dict(_mapping(o, f"{where}: 'posthoc_probe_options.{p}'")) for p, o in
                                   _mapping(data.get("posthoc_probe_options") or {}, f"{where}: 'posthoc_probe_options'").items()},
            extra={k: v for k, v in data.items() if k not in known},
        )

    def replace(self, **fields: Any) -> "RunRecord":
        """A copy with `fields` changed (sections may be given as run.json dicts); a field name it does not
        know is refused, so a misspelt update never lands in run.json as a new key."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise RunError(f"run.json has no field {', '.join(map(repr, unknown))}; its fields: {', '.join(sorted(names))}")
        if isinstance(fields.get("imported"), dict):
            fields["imported"] = ImportedSeries.from_json(fields["imported"], "imported")
        if isinstance(fields.get("trainer"), dict):
            fields["trainer"] = TrainerOrigin.from_json(fields["trainer"], "trainer")
        return dataclasses.replace(self, **fields)


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise RunError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def write_run_record(path: Path | str, record: RunRecord) -> Path:
    """Write run.json atomically (a reader never sees half of it); refuses a status phaselens does not write."""
    if record.status not in STATUSES:
        raise RunError(f"{path}: status must be one of {', '.join(STATUSES)}, got {record.status!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record.to_json())
    return path


def read_run_record(path: Path | str) -> RunRecord:
    """The record at `path` (RunError naming the file if it is missing, not JSON, or malformed)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise RunError(f"{path.parent} is not a phaselens run: {path.name} is missing") from exc
    except OSError as exc:
        raise RunError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    try:
        data = parse_json(text)
    except ValueError as exc:
        raise RunError(f"{path} is not valid JSON: {exc}") from exc
    return RunRecord.from_json(data, str(path))
