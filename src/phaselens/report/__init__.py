"""`phaselens report RUN`: figures and a `report.md` that says what happened in a run, and when.

The report has a part that depends on the study the run belongs to (its task: what to look for,
which figures to draw) and parts every run shares (configuration, transitions). A study's part is
a function registered for one or more task names (a task cannot import its report: the report
layer sits above it); a run of a task without one gets the generic part (`report.generic`: the
loss and every probe's figures). A section is a function that adds a part when the run has the
probes it needs (e.g. geometry or neurons). Every module of this package is imported before a
report is written, so a new study's report module registers itself by being there. Reads the run only through the
public run API and never imports torch, so a report of a finished run is quick on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from phaselens.registry import qualified_name, register
from phaselens.report.plotting import Figure
from phaselens.run import Run, open_run
from phaselens.signals.transitions import MIN_EFFECT

MAX_TRANSITION_ROWS = 40
TRANSITION_COLUMNS = ["probe", "metric", "layer", "head", "step", "start", "end", "before", "after", "effect", "source"]
CONFIG_SECTIONS = ("model", "data", "train", "telemetry")


@dataclass
class StudyReport:
    """What a study contributes: text sections before the shared ones, and its figures section."""

    summary: list[str]
    figures: str = ""
    extra: list[str] = field(default_factory=list)  # sections after the figures


Study = Callable[[Run, Path], StudyReport]
Section = Callable[[Run, Path], "str | None"]
_STUDIES: dict[str, Study] = {}
_SECTIONS: dict[str, Section] = {}  # by the section function's module.qualname, in registration order


def register_study(*tasks: str) -> Callable[[Study], Study]:
    """Decorator: `study(run, out)` writes the report part of runs whose `data.task` is one of `tasks`."""

    def add(study: Study) -> Study:
        for task in tasks:
            register(_STUDIES, task, study, "report study for task")
        return study

    return add


def register_section(section: Section) -> Section:
    """Decorator: `section(run, out)` returns a markdown section (with its figures written to `out`), or None."""
    return register(_SECTIONS, qualified_name(section), section, "report section")


def _load_builtin() -> None:
    from phaselens.plugins import load_package

    load_package("phaselens.report")  # every report module registers its studies and sections


def write_report(run: str | Path | Run) -> Path:
    """Write the figures and `report.md` into `RUN/report/`; returns the path of report.md."""
    _load_builtin()
    run = run if isinstance(run, Run) else open_run(run)
    out = run.dir.report
    run.dir.require_writable("report", out)  # a read-only run: one line, not an OSError
    out.mkdir(parents=True, exist_ok=True)
    # A figure the last report drew and this one cannot must not survive it; any other PNG there is the user's.
    for stale in run.dir.report_figures():
        (out / stale).unlink(missing_ok=True)
    before = _figure_files(out)
    if run.task in _STUDIES:
        study = _STUDIES[run.task](run, out)
    else:  # a task without a report section of its own: the generic report, never another study's
        from phaselens.report.generic import generic_study

        study = generic_study(run, out)
    sections = [
        f"# phaselens report: {run.name}",
        *study.summary,
        "## Configuration\n\n" + _config_table(run.config),
        "## Detected transitions\n\n" + _transitions_section(run.transitions()),
    ]
    if study.figures:
        sections.append("## Figures\n\n" + study.figures)
    sections += study.extra
    sections += [text for section in _SECTIONS.values() if (text := section(run, out))]
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    run.dir.record_report_figures([name for name, file in _figure_files(out).items() if before.get(name) != file])
    return path


def _figure_files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """The PNGs in `folder` by name, with what tells a file rewritten from one left alone (inode, mtime, size)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.png") if p.is_file()}


def figures_section(figures: dict[str, Figure], captions: dict[str, str]) -> str:
    """Markdown for written figures with their captions, naming what each had to leave out."""
    parts = []
    for name, figure in figures.items():
        if figure.path is None:
            parts.append(f"**{name}** left out: this run did not record " + "; ".join(figure.missing) + ".")
            continue
        part = f"![{name}]({figure.path.name})\n\n*{captions[name]}*"
        if figure.missing:
            part += "\n\nNot drawn (not recorded in this run): " + "; ".join(figure.missing) + "."
        parts.append(part)
    return "\n\n".join(parts)


def checkpoints_measured(run: Run, measured: pd.DataFrame) -> str:
    """A sentence on the post-hoc probes stored on `run`'s checkpoints (`measured`: its checkpoint rows),
    or, before any, the command that measures the defaults its task declares."""
    if measured.empty:
        defaults = ", ".join(run.study.post_hoc_probes)
        return f"No checkpoint measured yet: `phaselens probe {run.path}` measures the default probes ({defaults})."
    probes = ", ".join(f"`{p}`" for p in sorted(measured["probe"].unique()))
    return f"Measured on checkpoints: probes {probes} at {measured['step'].nunique()} checkpoints."


def _config_table(config: dict) -> str:
    rows = ["| setting | value |", "|---|---|"]
    for section in CONFIG_SECTIONS:
        for key, value in (config.get(section) or {}).items():
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            rows.append(f"| `{section}.{key}` | {shown} |")
    return "\n".join(rows)


def _cell(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _transitions_section(transitions: pd.DataFrame) -> str:
    if transitions.empty:
        return "No transitions detected: no series moved clearly more than its own step-to-step noise."
    total = len(transitions)
    shown = transitions.sort_values("strength", ascending=False).head(MAX_TRANSITION_ROWS)
    intro = (
        f"{total} transitions in all, strongest first (strength = change over the series' noise)"
        + (f"; the {len(shown)} strongest are shown." if total > len(shown) else ".")
        + " `step` is the steepest change, `start`–`end` the window where 10% and 90% of it are reached;"
        + f" `effect` is the change over its metric's range (at least {MIN_EFFECT:.2f}, see docs/concepts/claims.md);"
        + " `source` is the curve it was found on (live: training batches; checkpoint: the fixed probe batch)."
    )
    rows = ["| " + " | ".join(TRANSITION_COLUMNS) + " |", "|" + "---|" * len(TRANSITION_COLUMNS)]
    for record in shown[TRANSITION_COLUMNS].astype(object).itertuples(index=False):
        rows.append("| " + " | ".join(_cell(v) for v in record) + " |")
    return intro + "\n\n" + "\n".join(rows)
