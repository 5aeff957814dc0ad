"""The layout of a run directory, without torch:

    run.json          name, status, resolved config, model + task spec, versions
    checkpoints/      step_00001000/ model.safetensors, trainer.safetensors, trainer.json
    probe_batch.safetensors   the fixed probe batch every step and checkpoint is measured on
    samples/          fixed, seeded samples of the training data (the `llc` probe's n-sample)
    induction_batch.safetensors   random tokens with a repeated segment, for the probes the study routes to it (text, late disambiguation)
    metrics.sqlite    one row per value
    artifacts/        non-scalar probe results (JSON)
    report/           report.md and PNG figures
"""

from __future__ import annotations

import json
import platform
import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from phaselens.errors import RunError
from phaselens.store.atomic import write_json

STEP_DIR = re.compile(r"^step_(\d{8,})$")
STATUSES = ("running", "finished", "failed", "stopped")  # stopped: interrupted (Ctrl-C), resumable
# What phaselens writes at the top of a run directory; anything else there is the user's.
RUN_ENTRIES = frozenset({
    "run.json", "checkpoints", "probe_batch.safetensors", "induction_batch.safetensors", "metrics.sqlite", "metrics.sqlite-wal",
    "metrics.sqlite-shm", "metrics.sqlite-journal", "artifacts", "report", "unigram.json", "samples", "metrics.csv", "metrics.json", "metrics.parquet",
})
_KEPT_STORE = re.compile(r"^metrics\.sqlite\.damaged(-\d+)?(-wal|-shm)?$")  # set aside by a resume with --new-metrics
_TEMP_FILE = re.compile(r"^\.(.+)\.[^.]+\.tmp$")  # store.atomic's temporary sibling of a file being written


def versions() -> dict[str, str]:
    """The versions of Python and of the libraries that wrote a run (recorded in run.json)."""
    found = {"python": platform.python_version()}
    for package in ("phaselens", "torch", "transformer-lens", "transformers", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


class RunDir:
    """Paths and run.json of one run directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_db(self) -> Path:
        return self.path / "metrics.sqlite"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def probe_batch(self) -> Path:
        return self.path / "probe_batch.safetensors"

    def training_sample(self, n: int, seed: int) -> Path:
        """The fixed, seeded sample of n training sequences the `llc` probe draws its minibatches from."""
        return self.path / "samples" / f"train_n{n}_seed{seed}.safetensors"

    @property
    def induction_batch(self) -> Path:
        return self.path / "induction_batch.safetensors"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint directory (temp dirs of interrupted writes are ignored)."""
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for entry in self.checkpoints.iterdir():
            match = STEP_DIR.match(entry.name)
            # reference.json: a checkpoint of an imported series, which points to a model revision
            if match and entry.is_dir() and ((entry / "model.safetensors").is_file() or (entry / "reference.json").is_file()):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def exists(self) -> bool:
        return self.run_json.is_file()

    def read(self) -> dict[str, Any]:
        if not self.run_json.is_file():
            raise RunError(f"{self.path} is not a phaselens run: {self.run_json.name} is missing")
        try:
            data = json.loads(self.run_json.read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{self.run_json} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise RunError(f"{self.run_json} has no 'config' section")
        missing = [key for key in ("model", "data") if not isinstance(data["config"].get(key), dict)]
        if missing:  # a default would silently stand in for how the run was really trained
            raise RunError(f"{self.run_json}: its config has no {' or '.join(repr(k) for k in missing)} section, "
                           "so the run's model and task cannot be known; restore it from a copy of the run")
        return data

    def foreign_entries(self) -> list[str]:
        """Names in the directory (and its checkpoints/) that phaselens did not write: the user's files."""
        if not self.path.is_dir():
            return []
        foreign = []
        for entry in sorted(self.path.iterdir()):
            temp = _TEMP_FILE.match(entry.name)
            if entry.name not in RUN_ENTRIES and not (temp and temp.group(1) in RUN_ENTRIES) and not _KEPT_STORE.match(entry.name):
                foreign.append(entry.name)
        if self.checkpoints.is_dir():
            foreign += [f"checkpoints/{entry.name}" for entry in sorted(self.checkpoints.iterdir())
                        if not (STEP_DIR.match(entry.name) or entry.name.startswith(".step_"))]
        return foreign

    def removal_problem(self) -> str | None:
        """Why phaselens may not delete this directory; None when it can prove it wrote everything in it."""
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            return f"{self.path} is a file, not a run directory"
        try:
            data = self.read()
        except RunError as exc:
            return str(exc)
        if data.get("status") not in STATUSES:
            return f"{self.run_json} is not a phaselens run.json (its status is {data.get('status')!r})"
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            return f"{self.path} holds files phaselens did not write ({shown})"
        return None

    def remove(self) -> None:
        """Delete the run directory, refusing (RunError) unless every file in it is one phaselens wrote."""
        problem = self.removal_problem()
        if problem:
            raise RunError(f"{problem}; phaselens deletes only directories it wrote: move your files out or choose another --out")
        if self.path.exists():
            shutil.rmtree(self.path)

    def write(self, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.run_json, data)

    def update(self, **fields: Any) -> dict[str, Any]:
        data = self.read()
        data.update(fields)
        self.write(data)
        return data
