"""The layout of a run directory, without torch:

    run.json          name, status, resolved config, model + task spec, versions (`store.run_record`)
    checkpoints/      step_00001000/ model.safetensors, trainer.safetensors, trainer.json
    probe_batch.safetensors   the fixed probe batch every step and checkpoint is measured on
    samples/          fixed, seeded samples of the training data (the `llc` probe's n-sample)
    induction_batch.safetensors   random tokens with a repeated segment, for the probes the study routes to it (text, late disambiguation)
    metrics.sqlite    one row per value
    artifacts/        non-scalar probe results (JSON)
    report/           report.md and PNG figures
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from phaselens.errors import RunError
from phaselens.store.atomic import is_read_only, write_json
from phaselens.store.run_record import STATUSES, RunRecord, read_run_record, versions, write_run_record

__all__ = ["RunDir", "STATUSES", "versions"]

STEP_DIR = re.compile(r"^step_(\d{8,})$")
LOCK_FILE = "run.lock"  # held (flock) by the one process writing the run; it names that process
# What phaselens writes at the top of a run directory; anything else there is the user's.
RUN_ENTRIES = frozenset({
    "run.json", "checkpoints", "probe_batch.safetensors", "induction_batch.safetensors", "metrics.sqlite", "metrics.sqlite-wal",
    "metrics.sqlite-shm", "metrics.sqlite-journal", "artifacts", "report", "unigram.json", "samples", "metrics.csv", "metrics.json", "metrics.parquet",
    LOCK_FILE,
})
_KEPT_STORE = re.compile(r"^metrics\.sqlite\.damaged(-\d+)?(-wal|-shm)?$")  # set aside by a resume with --new-metrics
_TEMP_FILE = re.compile(r"^\.(.+)\.[^.]+\.tmp$")  # store.atomic's temporary sibling of a file being written
_CHECKPOINT_TEMP = re.compile(r"^\.step_\d{8,}\.(tmp|old)-\d+$")  # models.checkpoints' sibling of a checkpoint being written
# What phaselens writes inside its folders (a name matching none of these is the user's file):
CHECKPOINT_FILES = frozenset({"model.safetensors", "trainer.safetensors", "trainer.json", "reference.json"})
_SAMPLE_FILE = re.compile(r"^train_n\d+_seed\d+\.safetensors$")  # `RunDir.training_sample`
_ARTIFACT_FILE = re.compile(r"^step_\d{8,}\.(json|png)$")  # artifacts/<probe>/step_XXXXXXXX.json (llc_calibrate's figures too)
REPORT_FIGURES = "figures.json"  # report/: the figures the last report drew (`RunDir.report_figures`)
_REPORT_NEURONS = frozenset({"neurons.md", "neurons.png"})  # report/neurons/, written by `phaselens neurons`


class RunDir:
    """Paths and run.json of one run directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_db(self) -> Path:
        return self.path / "metrics.sqlite"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def probe_batch(self) -> Path:
        return self.path / "probe_batch.safetensors"

    def training_sample(self, n: int, seed: int) -> Path:
        """The fixed, seeded sample of n training sequences the `llc` probe draws its minibatches from."""
        return self.path / "samples" / f"train_n{n}_seed{seed}.safetensors"

    @property
    def induction_batch(self) -> Path:
        return self.path / "induction_batch.safetensors"

    def write_artifact(self, probe: str, step: int, artifact: Any) -> Path:
        """Store `probe`'s non-scalar result at `step`: artifacts/<probe>/step_XXXXXXXX.json (compact JSON)."""
        path = self.artifacts / probe / f"step_{step:08d}.json"
        write_json(path, artifact, compact=True)
        return path

    def checkpoint(self, step: int) -> Path:
        """The directory of the checkpoint at `step`; RunError if it (or a file in it) is a link out of the run."""
        path = self.checkpoints / f"step_{step:08d}"
        self.inside(path)
        for name in CHECKPOINT_FILES:
            self.inside(path / name)
        return path

    def inside(self, path: Path) -> Path:
        """`path`, refused (RunError naming it) when it resolves outside the run directory: a symlink to
        another run's checkpoint must never be read (or written through) as this run's."""
        root, resolved = self.path.resolve(), Path(path).resolve()
        if resolved != root and root not in resolved.parents:
            raise RunError(f"{path} resolves to {resolved}, outside the run {self.path}: phaselens reads only files inside "
                           "a run directory; replace the link with a copy of what it points to")
        return Path(path)

    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint directory (temp dirs of interrupted writes are ignored)."""
        if not self.checkpoints.is_dir():
            return []
        self.inside(self.checkpoints)
        steps = []
        for entry in self.checkpoints.iterdir():
            match = STEP_DIR.match(entry.name)
            if match:
                self.checkpoint(int(match.group(1)))  # refuses a checkpoint that links out of the run
            # reference.json: a checkpoint of an imported series, which points to a model revision
            if match and entry.is_dir() and ((entry / "model.safetensors").is_file() or (entry / "reference.json").is_file()):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def exists(self) -> bool:
        return self.run_json.is_file()

    def record(self) -> RunRecord:
        """The typed run.json (RunError naming the file if it is missing or malformed)."""
        if not self.run_json.is_file():
            raise RunError(f"{self.path} is not a phaselens run: {self.run_json.name} is missing")
        return read_run_record(self.run_json)

    def read(self) -> dict[str, Any]:
        """run.json as a dict, parsed and normalised by the record (older files come back with its defaults)."""
        return self.record().to_json()

    def foreign_entries(self) -> list[str]:
        """Names in the directory (and its checkpoints/) that phaselens did not write: the user's files."""
        if not self.path.is_dir():
            return []
        foreign = []
        for entry in sorted(self.path.iterdir()):
            temp = _TEMP_FILE.match(entry.name)
            if entry.is_symlink() or (entry.name not in RUN_ENTRIES and not (temp and temp.group(1) in RUN_ENTRIES)
                                      and not _KEPT_STORE.match(entry.name)):
                foreign.append(entry.name)
        if self.checkpoints.is_dir() and not self.checkpoints.is_symlink():
            for entry in sorted(self.checkpoints.iterdir()):
                if _CHECKPOINT_TEMP.match(entry.name) and not entry.is_symlink():
                    continue  # a checkpoint being written (or left half-written by a killed run)
                if not STEP_DIR.match(entry.name) or entry.is_symlink() or not entry.is_dir():
                    foreign.append(f"checkpoints/{entry.name}")
                else:
                    foreign += self._foreign_files(entry, lambda name: name in CHECKPOINT_FILES)
        if self.path.joinpath("samples").is_dir():
            foreign += self._foreign_files(self.path / "samples", _SAMPLE_FILE.match)
        if self.artifacts.is_dir() and not self.artifacts.is_symlink():
            for entry in sorted(self.artifacts.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    foreign += self._foreign_files(entry, _ARTIFACT_FILE.match)
                else:
                    foreign.append(f"artifacts/{entry.name}")
        if self.report.is_dir():
            drawn = set(self.report_figures()) | {"report.md", REPORT_FIGURES}
            foreign += self._foreign_files(self.report, drawn.__contains__, {"neurons": _REPORT_NEURONS.__contains__})
        return foreign

    def _foreign_files(self, folder: Path, ours, subfolders: dict | None = None) -> list[str]:
        """Entries of `folder` (run-relative names) that are not files phaselens writes there: `ours(name)`
        says which names it writes, `subfolders` maps a folder phaselens keeps inside to its own rule."""
        if folder.is_symlink():
            return [str(folder.relative_to(self.path))]
        foreign = []
        for entry in sorted(folder.iterdir()):
            name = entry.name
            temp = _TEMP_FILE.match(name)
            if entry.is_symlink():
                foreign.append(str(entry.relative_to(self.path)))
            elif subfolders and name in subfolders and entry.is_dir():
                foreign += self._foreign_files(entry, subfolders[name])
            elif not (entry.is_file() and (ours(name) or (temp and ours(temp.group(1))))):
                foreign.append(str(entry.relative_to(self.path)))
        return foreign

    def report_figures(self) -> list[str]:
        """The figures (file names in report/) that the last `write_report` drew: only these may be replaced."""
        try:
            data = json.loads((self.report / REPORT_FIGURES).read_text())
        except (OSError, ValueError):
            return []
        figures = data.get("figures") if isinstance(data, dict) else None
        return [f for f in figures if isinstance(f, str) and "/" not in f] if isinstance(figures, list) else []

    def record_report_figures(self, names: list[str]) -> None:
        """Remember the figures a report drew (report/figures.json: {"format": "phaselens.figures/1", "figures": [...]})."""
        write_json(self.report / REPORT_FIGURES, {"format": "phaselens.figures/1", "figures": sorted(names)})

    def removal_problem(self) -> str | None:
        """Why phaselens may not delete this directory; None when it can prove it wrote everything in it."""
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            return f"{self.path} is a file, not a run directory"
        try:
            status = self.record().status
        except RunError as exc:
            return str(exc)
        if status not in STATUSES:
            return f"{self.run_json} is not a phaselens run.json (its status is {status!r})"
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            return f"{self.path} holds files phaselens did not write ({shown})"
        return None

    def remove(self) -> None:
        """Delete the run directory, refusing (RunError) unless every file in it is one phaselens wrote and no
        other process is writing it."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunError(f"{self.path} is a file, not a run directory; phaselens deletes only directories it wrote")
        with self.writer_lock("replacing the run"):
            self.clear()
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        self.path.rmdir()

    def clear(self) -> None:
        """Delete what phaselens wrote in the run directory, keeping the lock its writer holds; refuses
        (RunError) unless every file there is one phaselens wrote. The caller holds `writer_lock`."""
        problem = self.removal_problem()
        if problem:
            raise RunError(f"{problem}; phaselens deletes only directories it wrote: move your files out or choose another --out")
        for entry in self.path.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def partial_checkpoints(self) -> list[Path]:
        """Temporary checkpoint directories a killed run left half-written (phaselens's own, by name)."""
        if not self.checkpoints.is_dir():
            return []
        return [e for e in self.checkpoints.iterdir() if _CHECKPOINT_TEMP.match(e.name) and e.is_dir() and not e.is_symlink()]

    def holds_only_a_lock(self) -> bool:
        """True for a directory that is empty but for the lock file (a writer stopped before writing run.json)."""
        return self.path.is_dir() and all(entry.name == LOCK_FILE for entry in self.path.iterdir())

    def require_writable(self, what: str, folder: Path | None = None) -> None:
        """RunError (one line) when `folder` (default: the run directory) cannot be written, a read-only mount or a
        folder this user may not write: `what` writes there. Readers (export, serve) never ask."""
        folder = folder if folder is not None and folder.is_dir() else self.path
        if folder.is_dir() and is_read_only(folder):
            raise RunError(f"{folder} is read-only: {what} writes into the run there; make it writable, or copy the run "
                           "somewhere writable (phaselens export reads a read-only run)")

    @contextmanager
    def writer_lock(self, what: str):
        """Hold the run's lock (an flock on RUN/run.lock) while this process writes the run: a second writer
        (train, train --resume, probe) is refused with one line naming the run and the holder's pid."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file; give a directory for the run")
        if self.path.is_dir() and not self.run_json.is_file() and not self.holds_only_a_lock():
            shown = ", ".join(sorted(e.name for e in self.path.iterdir())[:5])
            raise RunError(f"{self.path} is not empty and holds no phaselens run ({shown}); choose a new or empty --out")
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unlocked, as before
            yield
            return
        self.require_writable(what)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:  # a link, a directory
            raise RunError(f"cannot lock {self.path / LOCK_FILE} for writing the run ({exc.strerror})") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunError(f"{self.path} is in use: {holder} is writing it; a second writer is refused, "
                               "wait for that one to finish (or stop it)") from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} ({what})\n".encode(), 0)
            except OSError:  # a full disk: the lock holds all the same, only without the holder's name
                pass
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # released: no holder to name
        finally:
            os.close(fd)

    def write(self, record: RunRecord) -> None:
        """Write run.json atomically (the one writer: `store.run_record.write_run_record`)."""
        write_run_record(self.run_json, record)

    def update(self, **fields: Any) -> RunRecord:
        """Change `fields` of run.json (RunRecord field names; unknown keys already there are kept)."""
        record = self.record().replace(**fields)
        self.write(record)
        return record
