"""The layout of a run directory, without torch:

    run.json          name, status, resolved config, model + task spec, versions
    checkpoints/      step_00001000/ model.safetensors, trainer.safetensors, trainer.json
    probe_batch.safetensors   the fixed probe batch every step and checkpoint is measured on
    metrics.sqlite    one row per value
    artifacts/        non-scalar probe results (JSON)
    report/           report.md and PNG figures
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from phaselens.errors import RunError
from phaselens.store.atomic import write_json

STEP_DIR = re.compile(r"^step_(\d{8,})$")
STATUSES = ("running", "finished", "failed")


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
        if not isinstance(data, dict) or "config" not in data:
            raise RunError(f"{self.run_json} has no 'config' section")
        return data

    def write(self, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.run_json, data)

    def update(self, **fields: Any) -> dict[str, Any]:
        data = self.read()
        data.update(fields)
        self.write(data)
        return data
