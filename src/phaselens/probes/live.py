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

In a `torch.distributed` job only rank 0 measures and writes: on every other rank a Telemetry
installs no hooks, opens no store and measures nothing, so the same loop runs on every rank.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from phaselens.background import OrderedThread, spare_core
from phaselens.models.adapter import adapter_for
from phaselens.errors import ConfigError
from phaselens.probes.base import Layout, Measurement, Probe, ProbeInputs, flatten, make_probe
from phaselens.probes.plan import model_refusal
from phaselens.tasks.batch import TaskBatch


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
            values = torch.stack([v for _, v in entries]).cpu().tolist()  # (n_steps, n_values)
            for (step, _), vector in zip(entries, values):
                rows += [(step, probe, metric, layer, head, value, self.source)
                         for (probe, metric, layer, head), value in zip(keys, vector)]
        self.sink.write(rows)


class Telemetry:
    """Live probes for any TransformerLens-hooked model, one `with telemetry.step(...)` per step.

    Args:
        model: a `HookedRootModule` (phaselens models, TransformerLens models and bridges).
        probes: probe names or instances (default: attention, heads, loss).
        store: a metrics.sqlite path to write to (in a background thread); None keeps rows in memory.
        every: measure every `every` steps; other steps cost nothing.
        flush_every: move values to the CPU and the store every this many measured steps.
        source: the `source` column of the rows.
        background: measure probes that read only activations on a background thread while the
            step goes on. None (default): when the model is on the CPU and a core is spare.

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
        if self.rank != 0:  # another rank writes nothing, not even the store's schema
            store = None
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
        if self.rank != 0:
            self._background = None
            return
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
        acts, logits = self._acts, self._logits
        self._acts, self._logits = {}, None  # the next step's hooks fill new ones
        due = [p for p in self.probes if step % p.every == 0]
        inline = [p for p in due if self._background is None or not p.runs_off_thread(batch)]
        later = [p for p in due if p not in inline]
        results = self._measure(inline, acts, logits, batch, rows) if inline else []
        if later:
            batch = batch.clone()  # the caller may refill its buffers before the thread reads them
            self._submit(lambda: self.values.log_many(step, results + self._measure(later, acts, logits, batch, rows)))
        else:
            self._submit(lambda: self.values.log_many(step, results))
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

    def close(self) -> None:
        """Flush, wait for the writes, and remove the hooks."""
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

    def dataframe(self):
        """Rows recorded in memory (when no store was given) as a DataFrame."""
        import pandas as pd

        from phaselens.store.metrics import COLUMNS

        self.flush()
        if not isinstance(self.sink, MemorySink):
            raise RuntimeError("this Telemetry writes to a store; read it with pl.open_run(...).metrics()")
        frame = pd.DataFrame(self.sink.rows, columns=COLUMNS)
        return frame.astype({"layer": "Int64", "head": "Int64"})

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
