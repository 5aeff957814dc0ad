"""Live telemetry: run probes on the activations of the training forward itself.

Hooks keep references to the activations the probes need (no copies: autograd keeps them
alive anyway), probes reduce them on the device right after the forward, and the small
result vectors queue up on the device. Only `flush()` moves them to the CPU, in one
transfer per layout, and hands rows to the sink, so no step waits on the device or the disk.
On a CPU with a core to spare, probes that read only activations (`Probe.off_thread`) are
measured on a background thread while the backward pass and the optimizer run.

    telemetry = pl.Telemetry(model, probes=["attention", "heads"], store="metrics.sqlite")
    for step, batch in enumerate(loader):
        with telemetry.step(step, batch):
            loss = loss_fn(model(batch.tokens), batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    telemetry.close()

A probe that runs its own forwards and backwards (`Probe.live_on_copy`: circuits) reads no activations
of the training forward: at its cadence the weights are cloned (before the optimizer moves them) and a
copy of the model in eval mode, without parameter gradients, is measured on its fixed batch, on the
background thread where there is one; with `run=`, the artifact it writes post-hoc (circuits: every edge's
scores, read by `Run.edges()`) goes into the run directory at each step it measures. The training step's
autograd graph, gradients and RNG are left alone, so a run trains bit-identically with or without it.

In a `torch.distributed` job only rank 0 measures and writes: on every other rank a Telemetry
installs no hooks, opens no store and measures nothing, so the same loop runs on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from phaselens.background import OrderedThread, spare_core
from phaselens.models.adapter import adapter_for
from phaselens.errors import ConfigError
from phaselens.probes.base import Layout, Measurement, Probe, ProbeInputs, flatten, make_probe
from phaselens.probes.live_run import LoopRun
from phaselens.probes.plan import model_refusal
from phaselens.tasks.batch import TaskBatch

if TYPE_CHECKING:
    import pandas as pd


class MemorySink:
    """Keeps rows in memory; `Telemetry.dataframe()` reads them."""

    def __init__(self):
        self.rows: list[tuple] = []

    def write(self, rows: Sequence[tuple]) -> None:
        self.rows.extend(rows)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def distributed_rank() -> int:
    """This process's rank in a torch.distributed job: the initialised group's, else torchrun's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def run_probes(probes: Sequence[Probe], inputs: ProbeInputs) -> list[tuple[str, list[Measurement]]]:
    """Every probe's measurements on the same inputs (in inference mode: no autograd bookkeeping at all)."""
    with torch.inference_mode():
        return [(probe.name, probe.compute(inputs)) for probe in probes]


class _HookRemover:
    """Removes a permanent hook from a HookPoint, including its TransformerLens bookkeeping."""

    def __init__(self, point: Any, lens: Any):
        self.point, self.lens = point, lens

    def remove(self) -> None:
        self.lens.hook.remove()
        if self.lens in self.point.fwd_hooks:
            self.point.fwd_hooks.remove(self.lens)


class ValueQueue:
    """Probe values waiting on the device; `flush()` turns them into rows in one transfer per layout."""

    def __init__(self, sink: Any, source: str):
        self.sink, self.source = sink, source
        self._layouts: dict[tuple, Layout] = {}
        self._pending: list[tuple[int, tuple, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def log(self, step: int, probe: str, measurements: list[Measurement]) -> None:
        self.log_many(step, [(probe, measurements)])

    def log_many(self, step: int, results: list[tuple[str, list[Measurement]]]) -> None:
        """Queue several probes' values for one step as a single vector (one copy on the device)."""
        results = [(probe, ms) for probe, ms in results if ms]
        if not results:
            return
        key = tuple((probe, m.metric, tuple(m.value.shape)) for probe, ms in results for m in ms)
        if key not in self._layouts:
            self._layouts[key] = Layout([k for probe, ms in results for k in Layout.of(probe, ms).keys])
        self._pending.append((step, key, flatten([m for _, ms in results for m in ms])))

    def flush(self) -> None:
        if not self._pending:
            return
        by_layout: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for step, key, values in self._pending:
            by_layout.setdefault(key, []).append((step, values))
        self._pending = []
        rows = []
        for key, entries in by_layout.items():
            keys = self._layouts[key].keys
            listed = torch.stack([v for _, v in entries]).cpu().tolist()  # (n_steps, n_values)
            for (step, _), vector in zip(entries, listed):
                rows += [(step, probe, metric, layer, head, value, self.source)
                         for (probe, metric, layer, head), value in zip(keys, vector)]
        self.sink.write(rows)


class Telemetry:
    """Live probes for any TransformerLens-hooked model, one `with telemetry.step(...)` per step.

    Args:
        model: a `HookedRootModule` (phaselens models, TransformerLens models and bridges).
        probes: probe names or instances (default: attention, heads, loss).
        store: a metrics.sqlite path to write to (in a background thread); None keeps rows in memory.
        run: a run directory to write instead (created): run.json, the live rows, the first measured
            batch as probe batch, and the checkpoints `checkpoint(step)` saves, so `pl.open_run`,
            `phaselens report`, `serve`, `export` and `probe` read it like a run of `phaselens train`.
        name: the run's name (with `run`; default: the directory's name).
        every: measure every `every` steps; other steps cost nothing.
        flush_every: move values to the CPU and the store every this many measured steps.
        source: the `source` column of the rows.
        background: measure probes that read only activations on a background thread while the
            step goes on. None (default): when the model is on the CPU and a core is spare.
        copy_batches: probe name -> the fixed batch a probe measured on a copy of the weights reads
            (`Probe.live_on_copy`, e.g. circuits: the trainer passes the batch its plan routes it to);
            without one, such a probe reads the rows of the step's batch.

    In a `torch.distributed` job, only rank 0 measures: create the Telemetry after
    `init_process_group` (or under torchrun, which sets RANK) and the other ranks' is inert.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        probes: Sequence[str | Probe] = ("attention", "heads", "loss"),
        store: str | Path | Any | None = None,
        every: int = 1,
        flush_every: int = 100,
        source: str = "live",
        background: bool | None = None,
        run: str | Path | None = None,
        name: str | None = None,
        copy_batches: Mapping[str, TaskBatch] | None = None,
    ):
        import phaselens.probes  # noqa: F401  (registers the built-in probes)

        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model = model
        self.adapter = adapter_for(model)
        self.probes = [make_probe(p) for p in probes]
        for probe in self.probes:
            refused = model_refusal(probe, self.adapter.offers, self.adapter.kind, "live")
            if refused:
                raise ConfigError(refused)
        self.every, self.flush_every, self.source = every, flush_every, source
        self.n_layers, self.n_heads = self.adapter.n_layers, self.adapter.n_heads
        self.rank = distributed_rank()
        if run is not None and store is not None:
            raise ConfigError("give pl.Telemetry a store or a run directory, not both (a run keeps its rows in run/metrics.sqlite)")
        self.run: LoopRun | None = None
        if self.rank != 0:  # another rank writes nothing, not even the store's schema
            store = run = None
        if run is not None:
            self.run = LoopRun.create(run, model, self.adapter, [p.name for p in self.probes], every, name)
            store = self.run.dir.metrics_db
        if store is None:
            self.sink: Any = MemorySink()
        elif isinstance(store, (str, Path)):
            from phaselens.store.metrics import MetricsWriter

            Path(store).parent.mkdir(parents=True, exist_ok=True)
            self.sink = MetricsWriter(store)
        else:
            self.sink = store
        self._active = False
        self._acts: dict[str, torch.Tensor] = {}
        self._logits: torch.Tensor | None = None
        self._unflushed = 0  # measured steps since the last flush
        self.values = ValueQueue(self.sink, source)
        self._handles: list[Any] = []
        self._copy_batches = dict(copy_batches or {})
        self._shadow: torch.nn.Module | None = None
        if self.rank != 0:
            self._background = None
            return
        if any(p.live_on_copy for p in self.probes):  # copied before the hooks go in: the copy measures without them
            self._shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._install_hooks()
        # With a background thread, every change to `values` happens on it, in submission order.
        if background is None:
            try:
                background = spare_core(self.adapter.device)
            except StopIteration:  # a model without parameters
                background = False
        self._background = OrderedThread("phaselens-telemetry", "live telemetry", depth=4) if background else None

    def _install_hooks(self) -> None:
        names = sorted({n for p in self.probes for n in p.hook_names(self.adapter)})
        hook_dict = self.adapter.hook_points
        missing = [n for n in names if n not in hook_dict]
        if missing:
            raise ValueError(f"the model has no hook point(s) {missing}; probes need them")

        def keep(tensor: torch.Tensor, hook: Any) -> None:
            if self._active:
                self._acts[hook.name] = tensor

        for name in names:
            point = hook_dict[name]
            lens = point.add_hook(keep, is_permanent=True)
            self._handles.append(_HookRemover(point, lens))
        if any(p.needs_logits for p in self.probes):

            def keep_output(module: Any, args: Any, output: Any) -> None:
                if self._active and isinstance(output, torch.Tensor):
                    self._logits = output

            self._handles.append(self.model.register_forward_hook(keep_output))

    @property
    def in_background(self) -> bool:
        """Whether probes that read only activations are measured on a background thread."""
        return self._background is not None

    def is_due(self, step: int) -> bool:
        """Whether `step` is measured (never on a rank other than 0)."""
        return self.rank == 0 and step % self.every == 0

    @contextlib.contextmanager
    def step(self, step: int, batch: TaskBatch | torch.Tensor, rows: slice | None = None) -> Iterator[None]:
        """Measure the forward pass run inside this block.

        Args:
            step: the step number the values are logged under.
            batch: the batch (or just its tokens) whose forward runs in the block.
            rows: the rows of the forward that belong to `batch`, when the forward runs on more.
        """
        if not self.is_due(step):
            yield
            return
        self._active, self._acts, self._logits = True, {}, None
        try:
            yield
        finally:
            self._active = False
        self._record(step, batch, rows)

    def _record(self, step: int, batch: TaskBatch | torch.Tensor, rows: slice | None) -> None:
        batch = TaskBatch.coerce(batch)
        if self.run is not None:
            self.run.saw(step, batch.rows(rows) if rows is not None else batch)
        acts, logits = self._acts, self._logits
        self._acts, self._logits = {}, None  # the next step's hooks fill new ones
        due = [p for p in self.probes if step % p.every == 0]
        on_copy = [p for p in due if p.live_on_copy]
        due = [p for p in due if not p.live_on_copy]
        inline = [p for p in due if self._background is None or not p.runs_off_thread(batch)]
        later = [p for p in due if p not in inline]
        results = self._measure(inline, acts, logits, batch, rows) if inline else []
        if later:
            batch = batch.clone()  # the caller may refill its buffers before the thread reads them
            self._submit(lambda: self.values.log_many(step, results + self._measure(later, acts, logits, batch, rows)))
        else:
            self._submit(lambda: self.values.log_many(step, results))
        if on_copy:
            self._measure_on_copy(step, on_copy, batch.rows(rows) if rows is not None else batch)
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self._unflushed = 0
            self._submit(self.values.flush)

    def _measure(self, probes: list[Probe], acts: dict, logits: torch.Tensor | None, batch: TaskBatch, rows: slice | None):
        index = rows if rows is not None else slice(None)
        with torch.inference_mode():  # no autograd views of the training graph, on any thread
            # No detach: `flatten` detaches what the probes return.
            inputs = ProbeInputs(acts={name: act[index] for name, act in acts.items()}, batch=batch, model=self.model,
                                 logits=logits[index] if logits is not None else None, n_layers=self.n_layers, n_heads=self.n_heads,
                                 _adapter=self.adapter)
            return run_probes(probes, inputs)

    def _measure_on_copy(self, step: int, probes: list[Probe], batch: TaskBatch) -> None:
        """Measure `probes` on a copy of the weights as they are at `step` (after `step` updates), off the step.

        The weights are cloned here, before the optimizer moves them; the copy (eval mode, no parameter
        gradients) is measured on the background thread when there is one, else now. Nothing of the training
        step is touched: not its autograd graph, nor the parameters' gradients, nor the RNG (the probes draw
        from their own seeded generators; inline, the global RNG state is restored after them as well).
        """
        from phaselens.probes.measure import measure_model

        with torch.no_grad():
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}  # the weights at `step`
        for p in probes:  # one fixed batch, so that the steps compare: the trainer's routed batch, else the first measured
            if p.name not in self._copy_batches:  # (in a run directory: its probe batch, `LoopRun.saw`)
                self._copy_batches[p.name] = batch.clone()
        batches = [(p, self._copy_batches[p.name]) for p in probes]

        artifacts: dict[str, Any] | None = {} if self.run is not None else None  # a run directory keeps them (`Run.edges()`)

        def measure() -> None:
            assert self._shadow is not None  # built in __init__ whenever checkpoint probes run in the background
            self._shadow.load_state_dict(weights)
            results = [item for probe, fixed in batches for item in measure_model(self._shadow, fixed, [probe], artifacts=artifacts)]
            self.values.log_many(step, results)
            if self.run is not None and artifacts:
                for name, value in artifacts.items():
                    self.run.dir.write_artifact(name, step, value)

        if self._background is not None:
            self._background.submit(measure)
            return
        device = self.adapter.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            measure()

    def _submit(self, fn: Any) -> None:
        """Run `fn` now, or on the background thread after what was submitted before it."""
        if self._background is None:
            fn()
        else:
            self._background.submit(fn)

    def log(self, step: int, probe: str, measurements: list[Measurement]) -> None:
        """Queue values computed elsewhere (the training loss, say) under `probe` at `step` (rank 0 only)."""
        if self.rank != 0:
            return
        self._submit(lambda: self.values.log(step, probe, measurements))

    def flush(self) -> None:
        """Move queued values to the CPU (one transfer per layout) and hand the rows to the sink.

        Waits for the background thread, so every step recorded so far is in the rows handed on.
        """
        self._unflushed = 0
        self._submit(self.values.flush)
        if self._background is not None:
            self._background.wait()

    def checkpoint(self, step: int) -> Path | None:
        """Save the model's weights as the run's checkpoint at `step` (with `run=`; phaselens's own models),
        for `phaselens probe` to measure afterwards. Other ranks save nothing."""
        if self.rank != 0:
            return None
        if self.run is None:
            raise ConfigError("telemetry.checkpoint(step) saves into the run directory: create the Telemetry with run=DIR")
        return self.run.checkpoint(step)

    def close(self, status: str = "finished", reason: str | None = None) -> None:
        """Flush, wait for the writes, and remove the hooks; a run directory is marked `status`."""
        try:
            self.flush()
        finally:
            if self._background is not None:
                self._background.close()
                self._background = None
            if hasattr(self.sink, "close"):
                self.sink.close()
            for handle in self._handles:
                handle.remove()
            self._handles = []
            if self.run is not None and self.run.open:
                self.run.finish(status, reason)

    def dataframe(self) -> pd.DataFrame:
        """The rows recorded so far as a DataFrame: from memory, or read back from the store written to."""
        import pandas as pd

        from phaselens.store.metrics import COLUMNS, MetricsStore

        self.flush()
        if isinstance(self.sink, MemorySink):
            frame = pd.DataFrame(self.sink.rows, columns=COLUMNS)
            return frame.astype({"layer": "Int64", "head": "Int64"})
        path = getattr(self.sink, "path", None)
        if path is None:
            raise RuntimeError(f"this Telemetry writes to {type(self.sink).__name__}, which it cannot read back")
        if hasattr(self.sink, "flush"):
            self.sink.flush()  # every queued row on disk
        store = MetricsStore(path, create=False)
        try:
            return store.read()
        finally:
            store.close()

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
        elif issubclass(kind, KeyboardInterrupt):
            self.close("stopped", "interrupted (Ctrl-C)")
        else:
            self.close("failed", f"{kind.__name__}: {error}")
