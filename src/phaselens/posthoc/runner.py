"""Post-hoc probes over a run's checkpoints: plan what is missing, measure it, store it.

Each task is one checkpoint: the worker loads it once, runs the run's probe batch once with
only the hook points the requested probes read, and computes every probe from that cache.
Only the driver writes metrics.sqlite, so backends (local processes, Ray) just return rows.
Rows go in as each checkpoint finishes, which makes a killed sweep resumable: (step, probe)
pairs already stored with source `checkpoint` are skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from phaselens.background import OrderedThread
from phaselens.errors import PhaselensError
from phaselens.progress import progress_bar
from phaselens.store.atomic import write_json
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir

OPTIONS_KEY = "posthoc_probe_options"  # run.json: probe -> the options its stored checkpoint values were measured with

SOURCE = "checkpoint"
COMMIT_SECONDS = 1.0  # how often a sweep commits the rows measured so far
TRAINING_SAMPLE_SEED_OFFSET = 7_000_003  # the llc sample's generator: apart from the training, eval and probe streams


@dataclass
class TaskResult:
    """What a worker sends back for one checkpoint."""

    step: int
    probes: list[str]
    rows: list[tuple] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # probe -> JSON-able
    error: str | None = None
    seconds: float = 0.0
    weights_hash: str | None = None  # an imported series: the revision's content hash
    note: str | None = None  # how the revision was loaded, when that is worth saying


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


# ---------------------------------------------------------------------------- worker side

_WORKER_CACHE: dict[Any, Any] = {}  # per worker process: run state, and probes by run and names


def _worker_state(run_path: str, device: str | None = None, dtype: str | None = None):
    """Model skeleton (a `RevisionLoader` for an imported series), the run's probe batches by name and device,
    and its study (which batch each probe reads), built once per worker."""
    # an induction batch written since (`ensure_induction_batch`) is a new state
    key = (run_path, device, dtype, RunDir(run_path).induction_batch.is_file())
    state = _WORKER_CACHE.get(key)
    if state is None:
        from phaselens.models import build_model
        from phaselens.models.hf import read_reference
        from phaselens.run import open_run
        from phaselens.series.revisions import RevisionLoader, resolve_device, resolve_dtype

        run = open_run(run_path)
        where, precision = resolve_device(device), resolve_dtype(dtype)
        if run.imported:
            references = {}
            for step in run.checkpoint_steps():
                try:
                    ref = read_reference(run.dir.checkpoint(step))
                except Exception:  # measured (and recorded as failed) when its turn comes
                    continue
                references[step] = (ref["source"], ref["revision"], bool(ref.get("local")))
            stored = (run.info["imported"].get("weights_sha256") or {}).items()
            model = RevisionLoader(references, device=where, dtype=precision, hashes={int(s): h for s, h in stored})
        else:
            model = build_model(run.run_config().model).to(device=where, dtype=precision)
        batches = {name: batch.to(where) for name, batch in run.probe_batches().items()}
        state = _WORKER_CACHE[key] = (model, batches, where, run.run_config().study)
    return state


def _checkpoint_model(run_path: str, step: int, ahead: int | None, device: str | None, dtype: str | None):
    """(model at `step`, content hash, note): the skeleton with the checkpoint's weights, or the series'
    booted model with the revision's weights copied in (the revision `ahead` is read meanwhile)."""
    from phaselens.models.checkpoints import load_weights
    from phaselens.series.revisions import RevisionLoader

    model, _, _, _ = _worker_state(run_path, device, dtype)
    if isinstance(model, RevisionLoader):
        if step not in model.references:  # its reference.json is unreadable: say why
            from phaselens.models.hf import read_reference

            read_reference(RunDir(run_path).checkpoint(step))
        loaded = model.model_at(step, ahead)
        return loaded.model, loaded.digest, loaded.note
    load_weights(model, RunDir(run_path).checkpoint(step))
    return model, None, None


def _worker_probes(run_path: str, probe_names: Sequence[str], options: dict | None) -> list:
    """The probes, made and bound to the run once per worker, so what they cache (the heads probe's
    detection patterns of the fixed probe batch, the geometry probe's token counts) serves every checkpoint."""
    from phaselens.probes.base import make_probe

    key = ("probes", run_path, tuple(probe_names), json.dumps(options or {}, sort_keys=True))
    probes = _WORKER_CACHE.get(key)
    if probes is None:
        probes = [make_probe(name, **(options or {}).get(name, {})) for name in probe_names]
        for probe in probes:
            probe.bind_run(run_path)
        _WORKER_CACHE[key] = probes
    return probes


def measure_checkpoint(run_path: str, step: int, probe_names: Sequence[str], options: dict | None = None,
                       ahead: int | None = None, device: str | None = None, dtype: str | None = None) -> TaskResult:
    """Measure `probe_names` on checkpoint `step` of the run at `run_path` (runs in a worker).

    `ahead`: the checkpoint this worker will likely measure next (an imported series reads its
    weights meanwhile); `device` auto|cpu|cuda, `dtype` float32|bfloat16|float16: where and in
    what precision the model runs (probes reduce in float32 whatever the dtype).
    """
    began = time.perf_counter()
    result = TaskResult(step=step, probes=list(probe_names))
    try:
        import phaselens.probes  # noqa: F401  (registers the built-in probes)
        from phaselens.errors import CheckpointError
        from phaselens.probes.base import to_rows
        from phaselens.probes.measure import measure_batches

        _, batches, _, study = _worker_state(run_path, device, dtype)
        try:
            model, result.weights_hash, result.note = _checkpoint_model(run_path, step, ahead, device, dtype)
        except CheckpointError as exc:
            result.error = str(exc)
            return result
        probes = _worker_probes(run_path, probe_names, options)
        measured = measure_batches(model, batches, probes, artifacts=result.artifacts, batch_for=study.batch_for)
        result.rows = to_rows(step, SOURCE, measured)
    except Exception as exc:  # a sweep records the failure and goes on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.perf_counter() - began
    return result


# ---------------------------------------------------------------------------- driver side


def plan(run_dir: RunDir, store: MetricsStore, probes: Sequence[str], steps: Sequence[int] | None) -> tuple[list[tuple[int, list[str]]], int]:
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


def reconcile_options(run_dir: RunDir, store: MetricsStore, chosen: dict[str, dict], steps: Sequence[int] | None,
                      remeasure: bool) -> None:
    """Keep stored checkpoint values and the options they were measured with in step.

    run.json's `posthoc_probe_options` records, per probe, the options its stored checkpoint values were
    measured with. A sweep that asks a probe for other options would otherwise skip every stored
    (step, probe) pair and measure nothing new, so it is refused unless `remeasure`; with
    `remeasure`, the probes' stored values (at `steps`, or at every checkpoint) are dropped and
    measured again. Options that changed must be measured on every checkpoint, so one curve never
    mixes settings.
    """
    from phaselens.errors import ConfigError

    recorded = dict(run_dir.read().get(OPTIONS_KEY) or {})
    chosen = {p: _canonical(o) for p, o in chosen.items()}
    stored = {probe for _, probe in store.stored_pairs(SOURCE)}
    changed = {p: recorded[p] for p in chosen if p in stored and p in recorded and _canonical(recorded[p]) != chosen[p]}
    if changed and not remeasure:
        lines = "; ".join(f"{p}: stored with {_options_text(recorded[p])}, asked for {_options_text(chosen[p])}"
                          for p in changed)
        raise ConfigError(f"the stored values were measured with other probe options ({lines}): pass --remeasure to "
                          "replace them, or measure on a copy of the run")
    if changed and steps:
        raise ConfigError(f"probe options changed for {', '.join(changed)}: remeasure every checkpoint (drop --steps), "
                          "so one curve does not mix settings")
    if remeasure:
        for probe in chosen:
            store.delete_probe(probe, SOURCE, steps or None)
            if not steps:  # only the artifacts the sweep writes (`_write_artifacts`); anything else there is kept
                for artifact in (run_dir.artifacts / probe).glob("step_*.json"):
                    artifact.unlink()
    if {**recorded, **chosen} != recorded:  # run.json is rewritten only when the record changes
        run_dir.update(**{OPTIONS_KEY: {**recorded, **chosen}})


def _canonical(options: dict) -> dict:
    """Options as JSON gives them back, whole numbers as floats (gamma=300 and gamma=300.0 are one setting)."""
    return json.loads(json.dumps(options, sort_keys=True), parse_int=float)


def _options_text(options: dict) -> str:
    return json.dumps(options, sort_keys=True) if options else "the defaults"


def resolve_probes(names: Sequence[str] | None, task: str | None = None) -> list[str]:
    """The probes to measure: `names`, or the default set the run's `task` declares; refuses probes the task cannot feed."""
    from phaselens.errors import ConfigError
    from phaselens.probes.base import probe_names
    from phaselens.tasks.config import task_study
    from phaselens.tasks.study import GENERIC

    registered = probe_names()
    study = task_study(task) if task else GENERIC
    inapplicable = study.inapplicable_probes
    if not names:
        return [p for p in study.post_hoc_probes if p in registered]
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ConfigError(f"unknown probe(s) {unknown}; registered probes: {', '.join(registered)}")
    refused = [n for n in names if n in inapplicable]
    if refused:
        reasons = "; ".join(f"{n}: {inapplicable[n]}" for n in refused)
        usable = [p for p in registered if p not in inapplicable]
        raise ConfigError(f"probe(s) {refused} do not apply to a {task!r} run ({reasons}); usable probes: {', '.join(usable)}")
    return list(dict.fromkeys(names))


def resolve_options(names: Sequence[str], config: dict, options: dict[str, dict] | None = None) -> dict[str, dict]:
    """Each probe's options: what the run's task declares, then the run's `telemetry.probe_options`, then `options`."""
    from phaselens.probes.base import make_probe
    from phaselens.tasks.config import task_study
    from phaselens.tasks.study import GENERIC

    task = (config.get("data") or {}).get("task")
    study = task_study(task) if task else GENERIC
    configured = (config.get("telemetry") or {}).get("probe_options") or {}
    merged = {name: {**study.options_for(name, configured), **((options or {}).get(name) or {})} for name in names}
    for name, given in merged.items():  # bad options fail here, before any checkpoint loads
        try:
            make_probe(name, **given)
        except (TypeError, ValueError) as exc:
            from phaselens.errors import ConfigError

            raise ConfigError(f"probe {name!r} with options {given}: {exc}") from None
    return merged


def ensure_unigram(run_dir: RunDir) -> None:
    """Write the training data's token counts for a run trained before runs kept them (`geometry` reads them)."""
    from phaselens.store.unigram import unigram_path

    if not unigram_path(run_dir.path).is_file():
        from phaselens.run import open_run
        from phaselens.tasks.unigram import write_training_unigram

        write_training_unigram(open_run(run_dir.path).run_config(), unigram_path(run_dir.path))


def ensure_induction_batch(run_dir: RunDir, names: Sequence[str]) -> None:
    """Write the induction batch of a run trained before runs of its task kept one (text, late
    disambiguation), when a probe in `names` reads it (`Study.batch_for`)."""
    if run_dir.induction_batch.is_file():
        return
    from phaselens.probes.base import make_probe
    from phaselens.run import open_run

    run = open_run(run_dir.path)
    config = run.run_config()
    study = config.study
    if study.induction_batch and any(study.batch_for(make_probe(name)) == "induction" for name in names):
        from phaselens.errors import ConfigError
        from phaselens.training.trainer import induction_batch_for

        try:
            task = config.build_task()
        except ConfigError:  # its data is not kept (a Trainer run's dataset): its probes read the probe batch
            return
        induction = induction_batch_for(config, task, run.probe_batch())
        if induction is not None:
            induction.save(run_dir.induction_batch)


def ensure_training_sample(run_dir: RunDir, options: dict | None) -> None:
    """Write the run's fixed, seeded sample of training sequences that the `llc` probe samples from (once per n, seed)."""
    from phaselens.probes.llc import SGLDOptions

    settings = SGLDOptions.from_options(options or {})
    path = run_dir.training_sample(settings.n, settings.seed)
    if not path.is_file():
        import torch

        from phaselens.run import open_run

        task = open_run(run_dir.path).run_config().build_task()
        generator = torch.Generator().manual_seed(TRAINING_SAMPLE_SEED_OFFSET + settings.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        task.sample(settings.n, generator, split="train").save(path)


def _for_architecture(names: list[str], run_dir: RunDir, explicit: bool) -> list[str]:
    """Leave out default probes the run's model cannot run (BDH has no attention pattern); refuse requested ones."""
    from phaselens.errors import ConfigError
    from phaselens.run import open_run

    model = open_run(run_dir.path).run_config().model
    problems = {name: model.probe_problem(name) for name in names}
    if explicit and any(problems.values()):
        raise ConfigError("; ".join(p for p in problems.values() if p))
    return [name for name in names if not problems[name]]


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
        probes: probe names; default: the post-hoc probes the run's task declares (`phaselens.tasks.study`).
        steps: only these checkpoint steps (default: all).
        backend: "local" (in this process, or `workers` processes) or "ray" (a Ray task per checkpoint).
        workers: local worker processes, or the CPUs of a local Ray cluster.
        address: a Ray cluster to connect to (default: start a local one).
        device: auto (CUDA when present), cpu or cuda.
        dtype: float32, bfloat16 or float16 for the model's weights (an imported series: default the one
            given to import-hf); probes reduce in float32 whatever it is.
        options: probe name -> options, over the task's defaults and the run's `telemetry.probe_options`
            (e.g. {"logit_lens": {"first_token_only": True}}). run.json's `posthoc_probe_options` records what
            each probe's stored values were measured with; asking for other options is refused unless
            `remeasure` (see `reconcile_options`).
        remeasure: drop the stored checkpoint values of `probes` (at `steps`, or everywhere) and measure
            them again.
    """
    from phaselens.posthoc.backends import check_workers, get_backend

    check_workers(workers)
    began = time.time()
    run_dir = RunDir(run)
    info = run_dir.read()  # a clear error when this is not a run
    from phaselens.series.revisions import resolve_device, resolve_dtype

    imported = info.get("imported") or {}
    device, dtype = device or imported.get("device"), dtype or imported.get("dtype")
    resolve_device(device), resolve_dtype(dtype)  # refuse bad values here, not in every worker
    task = (info["config"].get("data") or {}).get("task")
    names = _for_architecture(resolve_probes(probes, task), run_dir, explicit=bool(probes))
    unknown = sorted(set(options or {}) - set(names))
    if unknown:
        from phaselens.errors import ConfigError

        raise ConfigError(f"probe option(s) for {unknown}, which this sweep does not measure (it measures {', '.join(names)})")
    chosen = resolve_options(names, info["config"], options)
    if "geometry" in names:
        ensure_unigram(run_dir)
    ensure_induction_batch(run_dir, names)
    if "llc" in names:
        ensure_training_sample(run_dir, chosen.get("llc"))
    store = MetricsStore(run_dir.metrics_db)
    try:
        reconcile_options(run_dir, store, chosen, steps, remeasure)
    except BaseException:
        store.close()
        raise
    tasks, skipped = plan(run_dir, store, names, steps)
    execute = get_backend(backend)
    measured, failures, n_rows = [], [], 0
    notes: list[str] = []
    hashes: dict[int, str] = {}
    # Rows go into the store in one transaction per second or so (a commit per checkpoint costs
    # more than measuring some of them). Artifacts are written (and fsynced) on a thread while the
    # next checkpoint is measured, and a result joins `done` only once its artifacts are on disk,
    # so stored rows mark what is done, artifacts included: a killed sweep redoes at most the last
    # second's checkpoints, and one whose artifacts failed to write is measured again next time.
    done: list[TaskResult] = []
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
            calls = [(str(run_dir.path), step, probes, {p: chosen[p] for p in probes},
                      tasks[i + workers][0] if i + workers < len(tasks) else None, device, dtype)
                     for i, (step, probes) in enumerate(tasks)]
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
        try:
            commit()  # also when interrupted: what was measured is kept
        finally:
            writer.close()
            store.close()
            if hashes:  # stored at first load, as soon as known, also when interrupted
                from phaselens.series.integrity import record_hashes

                record_hashes(run_dir, hashes)
    identical = []
    if imported or hashes:
        from phaselens.series.integrity import identical_texts

        identical = identical_texts(run_dir.read(), run_dir.checkpoint_steps())
    return SweepResult(run_dir.path, sorted(measured), skipped, sorted(failures), n_rows, time.time() - began, notes, identical)


def _write_artifacts(run_dir: RunDir, result: TaskResult) -> None:
    for probe, artifact in result.artifacts.items():
        write_json(run_dir.artifacts / probe / f"step_{result.step:08d}.json", artifact, compact=True)


def failures_text(result: SweepResult) -> str:
    return "\n".join(f"  step {step}: {reason}" for step, reason in result.failures)


def summary_json(result: SweepResult) -> str:
    return json.dumps({"measured": len(result.measured), "skipped_pairs": result.skipped,
                       "failures": len(result.failures), "rows": result.rows, "seconds": round(result.seconds, 2)})
