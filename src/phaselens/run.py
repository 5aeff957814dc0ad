"""`pl.open_run(path)`: the public view of one run directory.

Everything above the store (report, CLI, dashboard) reads runs through this class.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from phaselens.errors import CheckpointError
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir


class Run:
    """A training run or imported checkpoint series on disk."""

    def __init__(self, path: Path | str):
        self.dir = RunDir(path)
        self.info = self.dir.read()

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def name(self) -> str:
        return self.info.get("name", self.path.name)

    @property
    def status(self) -> str:
        return self.dir.read().get("status", "unknown")

    @property
    def config(self) -> dict[str, Any]:
        return self.info["config"]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, checkpoints={len(self.checkpoint_steps())})"

    @cached_property
    def _store(self) -> MetricsStore:
        return MetricsStore(self.dir.metrics_db, create=False)  # a reader never creates a store

    def metrics(
        self,
        probe: str | None = None,
        metric: str | None = None,
        source: str | None = None,
        layer: int | None = None,
        head: int | None = None,
    ) -> pd.DataFrame:
        """Rows (step, probe, metric, layer, head, value, source); `layer`/`head` are <NA> where not per layer/head."""
        return self._store.read(probe=probe, metric=metric, source=source, layer=layer, head=head)

    @property
    def imported(self) -> bool:
        """True for a public checkpoint series (`phaselens import-hf`): checkpoints reference model revisions."""
        return "imported" in self.info

    def checkpoint_steps(self) -> list[int]:
        return self.dir.checkpoint_steps()

    def identical_steps(self) -> dict[int, int]:
        """An imported series: step -> the step whose weights it repeats byte for byte (the duplicates only)."""
        from phaselens.series.integrity import identical_steps

        return identical_steps(self.dir.read())

    def identical_revisions(self) -> list[str]:
        """One sentence per group of revisions with identical weights ('steps 33000–143000: identical weights to …')."""
        from phaselens.series.integrity import identical_texts

        return identical_texts(self.dir.read(), self.checkpoint_steps())

    def run_config(self):
        """The resolved `RunConfig` this run was trained with."""
        from phaselens.training.config import RunConfig, from_dict

        return from_dict(RunConfig, self.config, origin=str(self.dir.run_json))

    def load_model(self, step: int | None = None, device: str | None = None):
        """The model at checkpoint `step` (default: the last), hookable with TransformerLens names."""
        from phaselens.models import build_model
        from phaselens.models.hf import boot_reference, is_reference
        from phaselens.models.checkpoints import load_weights

        steps = self.checkpoint_steps()
        if not steps:
            raise CheckpointError(f"{self.dir.checkpoints} holds no checkpoints")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise CheckpointError(f"{self.path} has no checkpoint at step {step}; available: {_summarise(steps)}")
        checkpoint = self.dir.checkpoint(step)
        if is_reference(checkpoint):  # an imported series: boot that revision through TransformerBridge
            return boot_reference(checkpoint, device)
        model = build_model(self.run_config().model)
        load_weights(model, checkpoint)
        model.eval()
        return model.to(device) if device else model

    def probe_batch(self):
        """The fixed probe batch every step and checkpoint of this run is measured on."""
        from phaselens.tasks.batch import TaskBatch

        return TaskBatch.load(self.dir.probe_batch)

    def probe_batches(self) -> dict:
        """The run's fixed batches by the name probes read them under (`Study.batch_for`): "probe", and
        "induction" where the run stores one beside its probe batch (text, late disambiguation, imported series)."""
        from phaselens.tasks.batch import TaskBatch

        batches = {"probe": self.probe_batch()}
        if self.dir.induction_batch.is_file():
            batches["induction"] = TaskBatch.load(self.dir.induction_batch)
        return batches

    def transitions(self, probe: str | None = None, metric: str | None = None) -> pd.DataFrame:
        """Detected phase transitions: probe, metric, layer, head, step, start, end, before, after.

        Revisions whose weights repeat another's are left out: their curves are flat by construction.
        """
        from phaselens.analysis.transitions import detect_transitions

        rows = self.metrics(probe=probe, metric=metric)
        duplicates = self.identical_steps()
        if duplicates:
            rows = rows[~rows["step"].isin(list(duplicates))]
        return detect_transitions(rows)


def _summarise(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} in all)"


def open_run(path: Path | str) -> Run:
    """Open the run directory at `path` (raises RunError if it is not one)."""
    return Run(path)
