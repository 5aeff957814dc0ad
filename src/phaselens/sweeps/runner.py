"""Train every point of a grid into its own run directory under one sweep directory.

    SWEEP_DIR/sweep.json                  the preset, the axes and the points
    SWEEP_DIR/lr=0.001_batch_size=64/     one ordinary run directory per point

Resumable: a finished run is skipped, an unfinished one (killed, interrupted) resumes from its
last checkpoint, a missing one starts. A run that fails is recorded and the sweep goes on.
Backends: `local` trains the runs one after another in this process (or in `workers` processes),
`ray` runs one Ray task per run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from phaselens.errors import ConfigError
from phaselens.progress import progress_bar
from phaselens.store.atomic import write_json
from phaselens.store.run_dir import RunDir
from phaselens.sweeps.grid import axis_keys, grid_points, parse_grid, point_name

SWEEP_FILE = "sweep.json"


@dataclass
class PointResult:
    """What one grid point's training came to."""

    name: str
    path: str
    status: str  # "finished", "skipped" (finished before), "failed"
    error: str | None = None
    seconds: float = 0.0


@dataclass
class SweepResult:
    path: Path
    points: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[PointResult]:
        return [p for p in self.points if p.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failures


def train_point(preset: str, overrides: list[str], path: str) -> PointResult:
    """Train (or resume, or skip) the run of one grid point; never raises (the sweep goes on)."""
    began = time.perf_counter()
    run = RunDir(path)
    name = run.path.name
    try:
        from phaselens.training.config import load_config
        from phaselens.training.trainer import train

        if run.exists() and run.read().get("status") == "finished":
            return PointResult(name, path, "skipped")
        # An unfinished run resumes (the trainer starts one over that never reached a checkpoint);
        # a directory holding anything else is refused, never emptied.
        result = train(load_config(preset, overrides), run.path, resume=run.exists(), progress=False)
        status = "finished" if result.status == "finished" else "failed"
        error = None if status == "finished" else f"stopped at step {result.steps_done}"
        return PointResult(name, path, status, error, time.perf_counter() - began)
    except Exception as exc:  # noqa: BLE001  (recorded; the sweep goes on)
        return PointResult(name, path, "failed", f"{type(exc).__name__}: {exc}", time.perf_counter() - began)


def plan_sweep(preset: str, axes: list[str], fixed: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(run name, overrides) per grid point; every point's config is validated before anything trains."""
    from phaselens.training.config import load_config

    parsed = parse_grid(axes)
    varied = set(axis_keys([axis for axis in parsed if len(axis[1]) > 1]))  # single values fix a key for every run
    points = []
    for point in grid_points(parsed):
        name = point_name({key: value for key, value in point.items() if key in varied})
        overrides = list(fixed or []) + [f"{key}={value}" for key, value in point.items()] + [f"name={name}"]
        load_config(preset, overrides)  # a bad key or value fails now, naming it, not after hours of training
        points.append((name, overrides))
    if len({name for name, _ in points}) != len(points):
        raise ConfigError("two grid points get the same directory name; use values that differ as text")
    return points


def run_sweep(
    preset: str,
    axes: list[str],
    out: Path | str,
    fixed: list[str] | None = None,
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train every point of the grid `axes` (["train.lr=1e-3,3e-3", ...]) of `preset` into `out`/<point>.

    Args:
        fixed: overrides every run shares (`train.steps=2000`).
        backend: "local" (in this process, or `workers` processes) or "ray" (a Ray task per run).
        workers: local processes, or the CPUs of a local Ray cluster.
        address: a Ray cluster to join (it must see `out`).
    """
    from phaselens.posthoc.backends import check_workers, get_backend

    execute = get_backend(backend)
    check_workers(workers)
    began = time.time()
    out = Path(out)
    points = plan_sweep(preset, axes, fixed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SWEEP_FILE, {"preset": preset, "axes": [[k, v] for k, v in parse_grid(axes)], "fixed": list(fixed or []),
                                  "points": [{"name": name, "overrides": o} for name, o in points]})
    tasks = [(preset, overrides, str((out / name).resolve())) for name, overrides in points]
    result = SweepResult(out)
    with progress_bar(f"sweep {out.name}", len(tasks), unit="runs", enabled=progress) as update:
        for point in execute(train_point, tasks, workers=workers, address=address):
            result.points.append(point)
            update(advance=1)
    result.points.sort(key=lambda p: [name for name, _ in points].index(p.name))
    result.seconds = time.time() - began
    return result
