"""Metric rows as TensorBoard scalars: one event-file folder per source, one tag per series.

    DIR/live/        events.out.tfevents.*   values measured inside training (on the training batch)
    DIR/checkpoint/  events.out.tfevents.*   values measured on checkpoints (on the fixed probe batch)

A row (step, probe, metric, layer, head, value, source) becomes the scalar `value` at `step` under
the tag `probe/metric` (per model), `probe/metric/L{layer}` (per layer) or `probe/metric/L{layer}H{head}`
(per head). The two sources are two TensorBoard runs, so a step measured both ways keeps both values.
TensorBoard stores scalars as float32 (`simple_value`): what reads back is the float32 nearest each value.

Written with TensorBoard's own event writer (the `tensorboard` package, no torch): `phaselens export
--format tensorboard` writes a finished run's rows, and `telemetry.tensorboard=DIR` mirrors live rows
on the metrics writer's thread while a run trains.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from phaselens.errors import ConfigError
from phaselens.store.metrics import Row

MISSING = "TensorBoard export needs the tensorboard package: pip install 'phaselens[tensorboard]'"


def scalar_tag(probe: str, metric: str, layer: int | None, head: int | None) -> str:
    """The TensorBoard tag of one series: probe/metric, then /L{layer} or /L{layer}H{head} where it has them."""
    where = (f"L{layer}" if layer is not None else "") + (f"H{head}" if head is not None else "")
    return f"{probe}/{metric}/{where}" if where else f"{probe}/{metric}"


def _require_tensorboard() -> Any:
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ConfigError(MISSING) from None
    return EventFileWriter


def _is_na(value: Any) -> bool:
    """None, pandas' <NA> or NaN in an Int64 column: a value the row does not have."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def check_log_dir(logdir: Path | str, key: str) -> None:
    """Refuse, naming `key`, a log directory that cannot be one, or a missing `tensorboard` package."""
    if not str(logdir).strip():
        raise ConfigError(f"{key} must name a directory for the TensorBoard event files")
    if Path(logdir).exists() and not Path(logdir).is_dir():
        raise ConfigError(f"{key}: {logdir} is a file; give a directory for the TensorBoard event files")
    _require_tensorboard()


class TensorBoardLog:
    """Writes metric rows as scalars into a TensorBoard log directory, one event folder per source.

    Not thread-safe: call it from one thread (the metrics writer's, when mirroring live telemetry).
    """

    def __init__(self, logdir: Path | str):
        check_log_dir(logdir, "the TensorBoard log directory")
        self.logdir = Path(logdir)
        self._writer_class = _require_tensorboard()
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writers: dict[str, Any] = {}

    def _writer(self, source: str) -> Any:
        if source not in self._writers:
            folder = self.logdir / source
            folder.mkdir(parents=True, exist_ok=True)
            self._writers[source] = self._writer_class(str(folder), flush_secs=10)
        return self._writers[source]

    def write(self, rows: Iterable[Row]) -> int:
        """Add each row with a value as one scalar event; returns how many were written (rows without a value, NULL or NaN, are skipped)."""
        written, now = 0, time.time()
        for step, probe, metric, layer, head, value, source in rows:
            if _is_na(value):
                continue  # no value (SQLite keeps a NaN as NULL, so the store and the log agree)
            layer = None if _is_na(layer) else int(layer)
            head = None if _is_na(head) else int(head)
            summary = self._summary(value=[self._summary.Value(tag=scalar_tag(probe, metric, layer, head),
                                                               simple_value=float(value))])
            self._writer(str(source)).add_event(self._event(wall_time=now, step=int(step), summary=summary))
            written += 1
        return written

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        """Write what is buffered and close every event file."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
