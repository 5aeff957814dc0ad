"""The run directory `pl.Telemetry(model, run=DIR)` writes from a user's own training loop.

`open_run`, `report`, `serve` and `export` read it like any run: run.json (status, the model's shape,
task `own_loop`, the live probes), the live rows in metrics.sqlite, the first measured batch as the probe
batch, and the checkpoints the loop asks for
with `telemetry.checkpoint(step)` (phaselens's own models), which `phaselens probe` then measures.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from phaselens.errors import ConfigError, RunError
from phaselens.models.adapter import ModelAdapter
from phaselens.models.checkpoints import save_checkpoint
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import RunRecord, timestamp, versions
from phaselens.tasks.batch import TaskBatch

OWN_KINDS = ("transformer", "bdh")  # adapters whose models phaselens builds from run.json (checkpoints load back)


def model_section(model: torch.nn.Module, adapter: ModelAdapter) -> dict[str, Any]:
    """run.json's `model` section: phaselens's own config, or the shape of a Hugging Face model."""
    own = adapter.own_config()
    if own is not None:
        return asdict(own)
    from phaselens.models.hf_config import HFModelConfig

    source = adapter.architecture
    return asdict(HFModelConfig.of(adapter, source=source))


class LoopRun:
    """A run directory fed by `pl.Telemetry` (create it with `LoopRun.create`)."""

    def __init__(self, run: RunDir, model: torch.nn.Module, adapter: ModelAdapter):
        self.dir, self.model, self.adapter = run, model, adapter
        self.has_batch = run.probe_batch.is_file()
        self.last_step: int | None = None
        self.open = True  # until `finish` marks the run

    @classmethod
    def create(cls, path: str | Path, model: torch.nn.Module, adapter: ModelAdapter, probes: Sequence[str], every: int,
               name: str | None = None) -> "LoopRun":
        run = RunDir(path)
        if run.exists():
            raise RunError(f"{run.path} already holds a run; give pl.Telemetry(run=...) a new directory")
        if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
            raise RunError(f"{run.path} is not empty and holds no phaselens run; give pl.Telemetry(run=...) a new or empty directory")
        run.path.mkdir(parents=True, exist_ok=True)
        config = {"name": name or run.path.name, "model": model_section(model, adapter),
                  "data": {"task": "own_loop", "seq_len": 0},
                  "telemetry": {"every": every, "probes": list(probes)}}
        run.write(RunRecord(name=name or run.path.name, status="running", config=config, versions=versions(),
                            created=timestamp(), device=str(adapter.device)))
        return cls(run, model, adapter)

    def saw(self, step: int, batch: TaskBatch) -> None:
        """A measured step: the first batch becomes the probe batch (head scores read it too)."""
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        if self.has_batch:
            return
        batch = batch.to("cpu")
        batch.save(self.dir.probe_batch)
        seq_len = batch.tokens.shape[1]
        record = self.dir.record()
        record.config["data"]["seq_len"] = record.task["seq_len"] = int(seq_len)
        self.dir.write(record)
        self.has_batch = True

    def checkpoint(self, step: int) -> Path:
        """Save the model's weights as the run's checkpoint at `step`."""
        if self.adapter.kind not in OWN_KINDS:
            raise ConfigError(f"telemetry.checkpoint saves phaselens's own models; a {self.adapter.architecture} is saved with "
                              "save_pretrained(DIR/step{N}) and read back with `phaselens import-hf DIR --revisions all` "
                              "(or train it with a transformers.Trainer and pl.TelemetryCallback)")
        path = self.dir.checkpoint(int(step))
        save_checkpoint(path, self.model, meta={"step": int(step)})
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        return path

    def finish(self, status: str, reason: str | None = None) -> None:
        """Mark run.json `status` (finished, stopped, failed with `reason`)."""
        self.open = False
        fields: dict[str, Any] = {"status": status, "finished": timestamp()}
        if self.last_step is not None:
            fields["steps_done"] = int(self.last_step)
        if reason:
            fields["stop_reason"] = reason
        self.dir.update(**fields)
