"""Post-hoc probes over a run's checkpoints: a scheduler of the run's measurement plan.

What is measured, with which options, on which batch, and which run files it needs is the plan's
decision (`Run.plan`, `phaselens.probes.plan`); the files are written by `phaselens.run_files`. This
module finds the (step, probe) pairs still missing, hands checkpoints to workers and stores the rows.
Each task is one checkpoint: the worker loads it once, runs the run's probe batch once with
only the hook points the requested probes read, and computes every probe from that cache.
Only the driver writes metrics.sqlite, so backends (local processes, Ray) just return rows.
Rows go in as each checkpoint finishes, which makes a killed sweep resumable: (step, probe)
pairs already stored with source `checkpoint` are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from phaselens.background import OrderedThread
from phaselens.errors import PhaselensError, RunError
from phaselens.posthoc.worker import SOURCE, TaskResult, measure_checkpoint
from phaselens.progress import progress_bar
from phaselens.store.atomic import disk_full, disk_of
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir

COMMIT_SECONDS = 1.0  # how often a sweep commits the rows measured so far


@dataclass
class SweepResult:
    run: Path
    measured: list[int]
    skipped: int
    failures: list[tuple[int, str]]
    rows: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. a revision booted fresh because its architecture differs
    identical: list[str] = field(default_factory=list)  # groups of revisions with identical weights, described

    @property
    def ok(self) -> bool:
        return not self.failures


def pending(run_dir: RunDir, store: MetricsStore, probes: Sequence[str], steps: Sequence[int] | None) -> tuple[list[tuple[int, list[str]]], int]:
    """Tasks (step, probes still missing there) and the number of (step, probe) pairs already stored."""
    available = run_dir.checkpoint_steps()
    if steps:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise PhaselensError(f"{run_dir.path} has no checkpoint at step(s) {missing}")
        available = sorted(set(steps))
    stored = store.stored_pairs(SOURCE)
    tasks, skipped = [], 0
    for step in available:
        todo = [p for p in probes if (step, p) not in stored]
        skipped += len(probes) - len(todo)
        if todo:
            tasks.append((step, todo))
    return tasks, skipped


def run_probes(
    run: str | Path,
    probes: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    options: dict[str, dict] | None = None,
    remeasure: bool = False,
) -> SweepResult:
    """Measure `probes` (default: the standard post-hoc set) on every checkpoint of `run` not yet measured.

    Args:
        run: the run directory.
        probes: probe names; default: the post-hoc probes the run's task declares, less those its model
            cannot run (named probes that cannot run are refused, with the reason).
        steps: only these checkpoint steps (default: all).
        backend: "local" (in this process, or `workers` processes) or "ray" (a Ray task per checkpoint).
        workers: local worker processes, or the CPUs of a local Ray cluster.
        address: a Ray cluster to connect to (default: start a local one).
        device: auto (CUDA when present), cpu, cuda, cuda:N or mps.
        dtype: float32, bfloat16 or float16 for the model's weights (an imported series: default the one
            given to import-hf); probes reduce in float32 whatever it is.
        options: probe name -> options, over the task's defaults and the run's `telemetry.probe_options`
            (e.g. {"logit_lens": {"first_token_only": True}}). run.json's `posthoc_probe_options` records what
            each probe's stored values were measured with; asking for other options is refused unless
            `remeasure` (`posthoc.option_record`).
        remeasure: drop the stored checkpoint values of `probes` (at `steps`, or everywhere) and measure
            them again.
    """
    from phaselens.posthoc.backends import check_workers, sigterm_as_interrupt
    from phaselens.run import open_run

    check_workers(workers)
    opened = open_run(run)  # a clear error when this is not a run
    # One writer per run, as train takes it: a second probe, or a train into the run, is refused naming this one.
    with opened.dir.writer_lock("probe"), sigterm_as_interrupt():
        try:
            return _sweep(opened, probes, steps, backend, workers, address, progress, device, dtype, options, remeasure)
        except Exception as exc:
            if not disk_full(exc):
                raise
            raise RunError(f"the disk holding {opened.dir.path}, {disk_of(opened.dir.path)}, is full: the checkpoints "
                           "measured before it filled are saved; free space and run the same command again "
                           "(it measures the rest)") from None


def _sweep(opened, probes, steps, backend, workers, address, progress, device, dtype, options, remeasure) -> SweepResult:
    """`run_probes`'s work on the opened run, while this process holds its writer lock."""
    from phaselens.models.device import resolve_device
    from phaselens.posthoc.backends import get_backend
    from phaselens.posthoc.option_record import reconcile_options
    from phaselens.run_files import ensure_run_files
    from phaselens.series.revisions import resolve_dtype

    began = time.time()
    run_dir = opened.dir
    imported = opened.info.get("imported") or {}
    device, dtype = device or imported.get("device"), dtype or imported.get("dtype")
    resolve_device(device), resolve_dtype(dtype)  # refuse bad values here, not in every worker
    execute = get_backend(backend)  # an unknown backend or a missing Ray, before anything is written
    plan = opened.plan(list(probes) if probes else None, options).require("--probes")
    ensure_run_files(opened, plan)
    if "induction_batch" in plan.run_files:  # the probes read it only where it could be written
        plan = opened.plan(list(probes) if probes else None, options, writable=False).require("--probes")
    chosen, routes = plan.options, plan.routes
    store = MetricsStore(run_dir.metrics_db)
    try:
        store.claim_write_lock()  # a store another process holds is named now, before any checkpoint is measured
        reconcile_options(run_dir, store, chosen, steps, remeasure)
    except BaseException:
        store.close()
        raise
    tasks, skipped = pending(run_dir, store, plan.names, steps)
    measured, failures, n_rows = [], [], 0
    notes: list[str] = []
    hashes: dict[int, str] = {}
    # Rows go into the store in one transaction per second or so (a commit per checkpoint costs
    # more than measuring some of them). Artifacts are written (and fsynced) on a thread while the
    # next checkpoint is measured, and a result joins `done` only once its artifacts are on disk,
    # so stored rows mark what is done, artifacts included: a killed sweep redoes at most the last
    # second's checkpoints, and one whose artifacts failed to write is measured again next time.
    done: list[TaskResult] = []
    results: Iterator[TaskResult] = iter(())
    last_commit = time.monotonic()
    writer = OrderedThread("phaselens-artifacts", "writing probe artifacts", depth=8)

    def written(result: TaskResult) -> None:  # on the writer thread
        _write_artifacts(run_dir, result)
        done.append(result)

    def commit() -> None:
        nonlocal n_rows, last_commit
        try:
            writer.wait()
        finally:  # what was written is kept, also when a write failed
            if done:
                store.write([row for result in done for row in result.rows])
                store.clear_failures([result.step for result in done])
                for result in done:
                    measured.append(result.step)
                    n_rows += len(result.rows)
                done.clear()
            last_commit = time.monotonic()

    try:
        with progress_bar(f"probe {run_dir.path.name}", len(tasks), unit="checkpoints", enabled=progress) as update:
            # each call names the step its worker likely takes next (the tasks go out in order,
            # `workers` at a time), so an imported series reads that revision's weights meanwhile
            calls = [(str(run_dir.path), step, {p: chosen[p] for p in todo}, {p: routes[p] for p in todo},
                      tasks[i + workers][0] if i + workers < len(tasks) else None, device, dtype)
                     for i, (step, todo) in enumerate(tasks)]
            results: Iterator[TaskResult] = execute(measure_checkpoint, calls, workers=workers, address=address) if calls else iter(())
            for result in results:
                if result.weights_hash:
                    hashes[result.step] = result.weights_hash
                if result.note:
                    notes.append(result.note)
                if result.error:
                    failures.append((result.step, result.error))
                    for probe in result.probes:
                        store.record_failure(result.step, probe, result.error)
                elif result.artifacts:
                    writer.submit(lambda result=result: written(result))
                else:
                    done.append(result)
                if time.monotonic() - last_commit > COMMIT_SECONDS:
                    commit()
                update(advance=1)
    finally:
        if hasattr(results, "close"):  # interrupted: the backend ends its workers now, not when the generator is collected
            results.close()
        try:
            commit()  # also when interrupted: what was measured is kept
        finally:
            writer.close()
            store.close()
            if hashes:  # stored at first load, as soon as known, also when interrupted
                from phaselens.series.integrity import record_hashes

                record_hashes(run_dir, hashes)
    if "circuits" in plan.names and (measured or remeasure):  # the over-training rows read every checkpoint's circuit
        from phaselens.analysis.circuits import store_circuit_analysis

        store_circuit_analysis(opened)
    if "essential_dynamics" in plan.names and not failures:  # the PCA spans every checkpoint: redone when they change
        from phaselens.analysis.essential_dynamics import update_essential_dynamics

        update_essential_dynamics(run_dir.path, force=remeasure)
    identical = []
    if imported or hashes:
        from phaselens.series.integrity import identical_texts

        identical = identical_texts(run_dir.read(), run_dir.checkpoint_steps())
    return SweepResult(run_dir.path, sorted(measured), skipped, sorted(failures), n_rows, time.time() - began, notes, identical)


def _write_artifacts(run_dir: RunDir, result: TaskResult) -> None:
    for probe, artifact in result.artifacts.items():
        run_dir.write_artifact(probe, result.step, artifact)


def failures_text(result: SweepResult) -> str:
    return "\n".join(f"  step {step}: {reason}" for step, reason in result.failures)
