"""`pl.open_run(path)`: the public view of one run directory.

Everything above the store (report, CLI, dashboard) reads runs through this class.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from phaselens.errors import CheckpointError
from phaselens.models.config import ModelSpec
from phaselens.tasks.config import DataConfig, task_study
from phaselens.tasks.study import Study
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import RunRecord
from phaselens.signals.sources import Prefer, prefer_source

if TYPE_CHECKING:  # for annotations only: these load torch, or sit above the run in the layers
    from phaselens.probes.plan import MeasurementPlan
    from phaselens.store.circuit_artifact import CircuitArtifact
    from phaselens.tasks.batch import TaskBatch
    from phaselens.training.config import RunConfig


class Run:
    """A training run or imported checkpoint series on disk."""

    def __init__(self, path: Path | str):
        self.dir = RunDir(path)
        self.record: RunRecord = self.dir.record()  # run.json as it was when the run was opened
        self.info = self.record.to_json()  # the same as a dict

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def name(self) -> str:
        return self.record.name or self.path.name

    @property
    def status(self) -> str:
        return self.dir.record().status  # read again: a run being trained changes it

    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    @property
    def task(self) -> str:
        """The run's task name (`data.task`); a config without one was trained with `DataConfig`'s default, as the loader reads it."""
        return str(self.config["data"].get("task", DataConfig.task))

    @property
    def study(self) -> Study:
        """What the run's task declares (probes, position sets, headline), from the task registry."""
        return task_study(self.task)

    @cached_property
    def spec(self) -> ModelSpec:
        """The run's typed model config (`spec.kind` is the architecture: transformer, bdh, hf, ...)."""
        from phaselens.training.config import from_dict

        return from_dict(ModelSpec, self.config["model"], origin=str(self.dir.run_json), prefix="model.")

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
        prefer: Prefer = None,
    ) -> pd.DataFrame:
        """Rows (step, probe, metric, layer, head, value, source); `layer`/`head` are <NA> where not per layer/head.

        Each row's `source` says where it was measured: "live" (inside training, on the training batch)
        or "checkpoint" (afterwards, on the fixed probe batch). By default (`prefer=None`) every row of
        both sources comes back, so a step measured both ways appears twice, once per source. To read
        one curve per (probe, metric, layer, head) series, say which source to prefer: "live",
        "checkpoint" (each falls back to the other source for a series that has only that one) or
        "densest" (the source with more measured steps), the rule of `phaselens.signals.sources`.
        `source=` instead keeps one source only, dropping the series the other source alone measured.
        """
        return prefer_source(self._store.read(probe=probe, metric=metric, source=source, layer=layer, head=head), prefer)

    @property
    def imported(self) -> bool:
        """True for a public checkpoint series (`phaselens import-hf`): checkpoints reference model revisions."""
        return self.record.imported is not None

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

    def run_config(self) -> RunConfig:
        """The resolved `RunConfig` this run was trained with."""
        from phaselens.training.config import RunConfig, from_dict

        return from_dict(RunConfig, self.config, origin=str(self.dir.run_json))

    def load_model(self, step: int | None = None, device: str | None = None) -> Any:
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

    def probe_batch(self) -> TaskBatch:
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

    def plan(self, names: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None,
             writable: bool = True) -> MeasurementPlan:
        """The post-hoc measurement plan of this run (`phaselens.probes.plan`): `names` (default: the study's
        post-hoc probes) with the task's, the run's configured and then `options`' options, on the batches
        this run keeps: an induction batch where the run has one, or (`writable`) can have one written
        (`phaselens.run_files`)."""
        from dataclasses import replace

        from phaselens.probes.plan import PlanContext, plan_probes

        config = self.run_config()
        context = PlanContext.of(config)
        keeps = self.dir.induction_batch.is_file() or (writable and context.induction_batch and type(config.data).rebuildable)
        return plan_probes(replace(context, induction_batch=keeps), "post_hoc", names, options)

    def edges(self) -> pd.DataFrame:
        """Edge scores of the `circuits` probe: step, edge, upstream, downstream, input, method, score, in_circuit
        (one row per checkpoint, edge and method; empty before `phaselens probe RUN --probes circuits`)."""
        from phaselens.store.circuit_artifact import read_all_circuits

        rows = [(a.step, e.edge, e.upstream, e.downstream, e.input, method, score, e.in_circuit)
                for a in read_all_circuits(self.dir.artifacts / "circuits") for e in a.edges for method, score in e.scores.items()]
        return pd.DataFrame(rows, columns=["step", "edge", "upstream", "downstream", "input", "method", "score", "in_circuit"])

    def circuit(self, step: int) -> CircuitArtifact | None:
        """The `circuits` probe's artifact at checkpoint `step` (`store.circuit_artifact.CircuitArtifact`), or None
        where the probe did not measure that step."""
        from phaselens.store.circuit_artifact import circuits_path, read_circuits

        path = circuits_path(self.dir.artifacts / "circuits", step)
        return read_circuits(path) if path.is_file() else None

    def circuit_steps(self) -> list[int]:
        """The checkpoint steps the `circuits` probe measured (it wrote an artifact for)."""
        from phaselens.store.circuit_artifact import measured_steps

        return measured_steps(self.dir.artifacts / "circuits")

    def transitions(self, probe: str | None = None, metric: str | None = None, prefer: Prefer = "densest") -> pd.DataFrame:
        """Detected phase transitions: probe, metric, layer, head, step, start, end, before, after, strength, source.

        Each series is searched on one curve, chosen by `prefer` (default "densest": the source with more
        measured steps, see `metrics`); `source` says which curve each transition was found on
        (`prefer=None` searches both curves of a series measured both ways).
        Revisions whose weights repeat another's are left out: their curves are flat by construction.
        Series that describe a measurement rather than the model (standard errors, confidence bounds, the
        agreement of two estimators: `signals.transitions.describes_a_measurement`) are searched only when
        `metric` names one.
        """
        from phaselens.signals.transitions import detect_transitions

        rows = self.metrics(probe=probe, metric=metric)
        duplicates = self.identical_steps()
        if duplicates:
            rows = rows[~rows["step"].isin(list(duplicates))]
        return detect_transitions(rows, prefer=prefer, measurements=metric is not None)


    def headline_transitions(self) -> pd.DataFrame:
        """The transitions that are the run's study's phenomenon (`tasks.study.Phenomenon`, e.g. late
        disambiguation's drop from the log K plateau), earliest first: the ones its report, `compare`
        and the dashboard mark. Empty where the study declares none."""
        from phaselens.signals.transitions import headline_transitions

        phenomenon = self.study.phenomenon
        if phenomenon is None:
            return self.transitions().iloc[0:0]
        return headline_transitions(self.transitions(probe=phenomenon.probe, metric=phenomenon.metric), phenomenon, self.config)


def _summarise(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} in all)"


def open_run(path: Path | str) -> Run:
    """Open the run directory at `path` (raises RunError if it is not one)."""
    return Run(path)
