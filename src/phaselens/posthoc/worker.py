"""The worker side of a post-hoc sweep: one checkpoint measured with a plan's probes, options and routes.

A worker (this process, a local process or a Ray task) loads the run's model skeleton and fixed
batches once, then for each checkpoint copies its weights in and runs one forward per batch in use
(`probes.measure.measure_batches`); it returns rows, never writes the store.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from phaselens.store.run_dir import RunDir

SOURCE = "checkpoint"


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


_WORKER_CACHE: dict[Any, Any] = {}  # per worker process: run state, and probes by run and names


def _worker_state(run_path: str, device: str | None = None, dtype: str | None = None):
    """Model skeleton (a `RevisionLoader` for an imported series) and the run's batches by name on the device,
    built once per worker."""
    # an induction batch written since (`run_files.ensure_run_files`) is a new state
    key = (run_path, device, dtype, RunDir(run_path).induction_batch.is_file())
    state = _WORKER_CACHE.get(key)
    if state is None:
        from phaselens.models import build_model
        from phaselens.models.hf import read_reference
        from phaselens.run import open_run
        from phaselens.models.device import resolve_device
        from phaselens.series.revisions import RevisionLoader, resolve_dtype

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
        state = _WORKER_CACHE[key] = (model, batches)
    return state


def _checkpoint_model(run_path: str, step: int, ahead: int | None, device: str | None, dtype: str | None):
    """(model at `step`, content hash, note): the skeleton with the checkpoint's weights, or the series'
    booted model with the revision's weights copied in (the revision `ahead` is read meanwhile)."""
    from phaselens.models.checkpoints import load_weights
    from phaselens.series.revisions import RevisionLoader

    model, _ = _worker_state(run_path, device, dtype)
    if isinstance(model, RevisionLoader):
        if step not in model.references:  # its reference.json is unreadable: say why
            from phaselens.models.hf import read_reference

            read_reference(RunDir(run_path).checkpoint(step))
        loaded = model.model_at(step, ahead)
        return loaded.model, loaded.digest, loaded.note
    load_weights(model, RunDir(run_path).checkpoint(step))
    return model, None, None


def _worker_probes(run_path: str, options: dict[str, dict]) -> list:
    """The probes, made and bound to the run once per worker, so what they cache (the heads probe's
    detection patterns of the fixed probe batch, the geometry probe's token counts) serves every checkpoint."""
    from phaselens.probes.base import make_probe

    key = ("probes", run_path, json.dumps(options, sort_keys=True))
    probes = _WORKER_CACHE.get(key)
    if probes is None:
        probes = [make_probe(name, **given) for name, given in options.items()]
        for probe in probes:
            probe.bind_run(run_path)
        _WORKER_CACHE[key] = probes
    return probes


def measure_checkpoint(run_path: str, step: int, options: dict[str, dict], routes: dict[str, str],
                       ahead: int | None = None, device: str | None = None, dtype: str | None = None) -> TaskResult:
    """Measure the probes of `options` (name -> options, a plan's) on checkpoint `step` of the run at `run_path`,
    each on the batch `routes` names (runs in a worker).

    `ahead`: the checkpoint this worker will likely measure next (an imported series reads its
    weights meanwhile); `device` auto|cpu|cuda[:N]|mps, `dtype` float32|bfloat16|float16: where and in
    what precision the model runs (probes reduce in float32 whatever the dtype).
    """
    began = time.perf_counter()
    result = TaskResult(step=step, probes=list(options))
    try:
        import phaselens.probes  # noqa: F401  (registers the built-in probes)
        from phaselens.errors import CheckpointError
        from phaselens.probes.base import to_rows
        from phaselens.probes.measure import measure_batches

        _, batches = _worker_state(run_path, device, dtype)
        try:
            model, result.weights_hash, result.note = _checkpoint_model(run_path, step, ahead, device, dtype)
        except CheckpointError as exc:
            result.error = str(exc)
            return result
        probes = _worker_probes(run_path, options)
        measured = measure_batches(model, batches, probes, routes, artifacts=result.artifacts)
        result.rows = to_rows(step, SOURCE, measured)
    except Exception as exc:  # a sweep records the failure and goes on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.perf_counter() - began
    return result
