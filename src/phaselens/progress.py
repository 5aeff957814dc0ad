"""One progress display for every long job (training, probe sweeps, llc, sweeps): a Rich bar with ETA on a
terminal or in a notebook, and plain log lines where stdout is a file or a pipe (a job under `nohup`, CI,
`| tee`), where a bar would print nothing until the end."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

LOG_SECONDS = 10.0  # a log line at least this often while the job moves
LOG_SHARE = 0.1  # and one each time another tenth of the job is done


@contextmanager
def progress_bar(label: str, total: int, unit: str = "", completed: int = 0, enabled: bool = True,
                 field: str | None = None) -> Iterator[Callable[..., None]]:
    """Yield `update(completed=None, advance=0, value=None)`; `field` names one extra column (e.g. "loss")."""
    if not enabled:
        yield lambda completed=None, advance=0, value=None: None
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not console.is_jupyter:
        log = ProgressLog(label, total, unit, completed, field)
        try:
            yield log.update
        finally:
            log.close()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    if field:
        columns.append(TextColumn(f"{field} {{task.fields[value]}}"))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total, completed=completed, value="…")

        def update(completed: int | None = None, advance: int = 0, value: str | None = None) -> None:
            fields = {"value": value} if value is not None else {}
            bar.update(task, completed=completed, advance=advance or None, **fields)

        yield update


def clock(seconds: float) -> str:
    """`h:mm:ss`, or `m:ss` under an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog:
    """Progress as plain lines, flushed as written: `train demo 500/3000 steps loss 2.310 12.4 steps/s eta 3:22`.

    A line is written when the job starts, then at the first update after `LOG_SECONDS` or after another
    `LOG_SHARE` of `total`, whichever comes first, and once at the end. The rate counts only the work done
    since the start of this job (a resumed run does not count its earlier steps).
    """

    def __init__(self, label: str, total: int, unit: str = "", completed: int = 0, field: str | None = None,
                 stream: TextIO | None = None, now: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit, self.field = label, max(0, int(total)), unit or "steps", field
        self.stream, self.now = stream or sys.stdout, now
        self.completed = self.started_at_count = int(completed)
        self.value: str | None = None
        self.started = self.last_time = now()
        self.every = max(1, int(self.total * LOG_SHARE))
        self.next_mark = self.completed + self.every
        self.last_written = -1
        self.write()

    def update(self, completed: int | None = None, advance: int = 0, value: str | None = None) -> None:
        if completed is not None:
            self.completed = int(completed)
        self.completed += int(advance or 0)
        if value is not None:
            self.value = value
        if self.completed >= self.next_mark or self.now() - self.last_time >= LOG_SECONDS:
            self.write()

    def close(self) -> None:
        if self.completed != self.last_written:
            self.write()

    def line(self) -> str:
        """The current line: label, done/total unit, the field, the rate and the time left (or taken)."""
        parts = [self.label, f"{self.completed}/{self.total} {self.unit}"]
        if self.field and self.value is not None:
            parts.append(f"{self.field} {self.value}")
        elapsed = self.now() - self.started
        done = self.completed - self.started_at_count
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            counted = self.unit.split(",")[0].strip()  # "SGLD steps, 3×4 chains": the rate is of SGLD steps
            parts.append(f"{rate:.3g} {counted}/s" if rate >= 1 else f"{1 / rate:.3g} s per {counted.removesuffix('s')}")
            left = max(0, self.total - self.completed)
            parts.append(f"eta {clock(left / rate)}" if left else f"done in {clock(elapsed)}")
        return " ".join(parts)

    def write(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.last_time, self.last_written = self.now(), self.completed
        while self.next_mark <= self.completed:
            self.next_mark += self.every
