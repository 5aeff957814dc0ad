"""`phaselens export RUN --format tensorboard`: every scalar series of a run as TensorBoard event files.

The layout and tags are `phaselens.store.tensorboard`'s (the live mirror writes the same):
OUT/live/ and OUT/checkpoint/, tag `probe/metric[/L{l}[H{h}]]`, step = training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phaselens.errors import RunError
from phaselens.run import Run
from phaselens.store.tensorboard import TensorBoardLog, check_log_dir


@dataclass
class TensorBoardExport:
    """What an export wrote: `scalars` events under `out`, one folder per source."""

    out: Path
    scalars: int
    folders: list[Path]


def export_tensorboard(run: Run, out: Path | str) -> TensorBoardExport:
    """Write every metric row of `run` that has a value as a TensorBoard scalar under `out`."""
    out = Path(out)
    check_log_dir(out, "--out")
    frame = run.metrics()
    sources = sorted(frame["source"].unique()) if len(frame) else []
    for source in sources:
        if any((out / source).glob("events.out.tfevents.*")):
            raise RunError(f"--out {out}: {out / source} already holds TensorBoard event files; choose another --out "
                           "(a second export beside them would show every value twice)")
    log = TensorBoardLog(out)
    try:
        written = log.write(frame.itertuples(index=False, name=None))
    finally:
        log.close()
    return TensorBoardExport(out=out, scalars=written, folders=[out / source for source in sources])
