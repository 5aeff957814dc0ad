"""One Rich progress bar with ETA for every long job (training, sweeps)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(label: str, total: int, unit: str = "", completed: int = 0, enabled: bool = True,
                 field: str | None = None) -> Iterator[Callable[..., None]]:
    """Yield `update(completed=None, advance=0, value=None)`; `field` names one extra column (e.g. "loss")."""
    if not enabled:
        yield lambda completed=None, advance=0, value=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    if field:
        columns.append(TextColumn(f"{field} {{task.fields[value]}}"))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=total, completed=completed, value="…")

        def update(completed: int | None = None, advance: int = 0, value: str | None = None) -> None:
            fields = {"value": value} if value is not None else {}
            bar.update(task, completed=completed, advance=advance or None, **fields)

        yield update
