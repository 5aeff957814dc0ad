"""The `essential_dynamics` artifacts: one typed reader and writer each, torch-free.

Per checkpoint, written by the probe (`probes.essential_dynamics`) through the post-hoc runner or the trainer:

    RUN/artifacts/essential_dynamics/step_<S>.json
    {"format": "phaselens.essential_dynamics/1",   (the step is the file's name)
     "output": "logprob" | "logits",   what each value is (see the probe's docstring)
     "positions": P,                   predicted positions read (of the probe batch, in row-major order)
     "vocab": [token ids] | null,      "logits": the token ids whose log-probabilities are recorded
     "values": [D floats]}             the output vector of this checkpoint (D = P, or P · len(vocab))

Over all checkpoints, written by `analysis.essential_dynamics.update_essential_dynamics` (the PCA is a
series-level result, so its file is named by the last checkpoint it covers; older ones are replaced):

    RUN/artifacts/essential_dynamics_pca/step_<last S>.json
    {"format": "phaselens.essential_dynamics_pca/1", "steps": [n], "dimension": D, "output": ...,
     "explained": [K] fraction of variance per component, "null_explained": [K] 6/(π²k²),
     "matched_null_explained": [K] the same fraction averaged over the simulated walks,
     "coords": [n][3] PC1–PC3 per checkpoint, "turning": [n] degrees (null at the ends),
     "threshold": [n] the null's turning quantile per checkpoint (null at the ends),
     "turning_points": [steps] beyond the null, "null": {walks, seed, alpha, window, dims, walk_dimension}}
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phaselens.errors import RunError
from phaselens.store.atomic import read_json, write_json
from phaselens.store.run_dir import RunDir

PROBE = "essential_dynamics"
OUTPUTS_FORMAT = "phaselens.essential_dynamics/1"
PCA_FORMAT = "phaselens.essential_dynamics_pca/1"
PCA_FOLDER = "essential_dynamics_pca"
_STEP_FILE = re.compile(r"^step_(\d{8,})\.json$")


class EssentialDynamicsError(RunError):
    """An essential-dynamics artifact is unreadable or does not match the others of its run."""


@dataclass(frozen=True)
class OutputVector:
    """One checkpoint's output vector (the probe's artifact)."""

    step: int
    output: str
    positions: int
    vocab: list[int] | None
    values: list[float]

    def to_json(self) -> dict:
        data = asdict(self)
        del data["step"]
        return {"format": OUTPUTS_FORMAT, **data}

    @classmethod
    def read(cls, path: Path) -> "OutputVector":
        data = _load(path, OUTPUTS_FORMAT)
        try:
            return cls(step=int(_STEP_FILE.match(path.name).group(1)), output=str(data["output"]), positions=int(data["positions"]),
                       vocab=None if data.get("vocab") is None else [int(v) for v in data["vocab"]],
                       values=[float(v) for v in data["values"]])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise EssentialDynamicsError(f"{path}: not a {OUTPUTS_FORMAT} artifact ({exc})") from None


@dataclass
class Trajectory:
    """The PCA of a run's output vectors across its checkpoints, with the random-walk null."""

    steps: list[int]
    dimension: int
    output: str
    explained: list[float]
    null_explained: list[float]
    matched_null_explained: list[float]
    coords: list[list[float]]  # (n, 3)
    turning: list[float | None]  # (n,) degrees; None where the trajectory has no step on one side
    threshold: list[float | None]  # (n,)
    turning_points: list[int]
    null: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": PCA_FORMAT, **asdict(self)}

    @classmethod
    def read(cls, path: Path) -> "Trajectory":
        data = _load(path, PCA_FORMAT)
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise EssentialDynamicsError(f"{path}: not a {PCA_FORMAT} artifact ({exc})") from None


def output_paths(run: Path | str) -> dict[int, Path]:
    """Step -> per-checkpoint output file of every checkpoint the probe measured."""
    return _step_files(RunDir(run).artifacts / PROBE)


def write_output(run: Path | str, vector: OutputVector) -> None:
    write_json(RunDir(run).artifacts / PROBE / f"step_{vector.step:08d}.json", vector.to_json(), compact=True)


def read_outputs(run: Path | str, steps: list[int] | None = None) -> list[OutputVector]:
    """The output vectors of a run (at `steps`, default all), by step."""
    paths = output_paths(run)
    chosen = sorted(paths) if steps is None else [s for s in sorted(steps) if s in paths]
    return [OutputVector.read(paths[s]) for s in chosen]


def trajectory_path(run: Path | str) -> Path | None:
    """The stored PCA file (the one covering the latest checkpoint), or None."""
    files = _step_files(RunDir(run).artifacts / PCA_FOLDER)
    return files[max(files)] if files else None


def read_trajectory(run: Path | str) -> Trajectory | None:
    path = trajectory_path(run)
    return None if path is None else Trajectory.read(path)


def write_trajectory(run: Path | str, trajectory: Trajectory) -> Path:
    """Store `trajectory` as the run's PCA file and remove the older ones (files this writer named)."""
    folder = RunDir(run).artifacts / PCA_FOLDER
    path = folder / f"step_{max(trajectory.steps):08d}.json"
    write_json(path, trajectory.to_json(), compact=True)
    for old in _step_files(folder).values():
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _step_files(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in sorted(folder.iterdir()) if (m := _STEP_FILE.match(p.name)) and p.is_file()}


def _load(path: Path, fmt: str) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise EssentialDynamicsError(f"{path} is unreadable ({exc}); measure it again with "
                                     f"`phaselens probe RUN --probes {PROBE} --remeasure`") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise EssentialDynamicsError(f"{path}: not a {fmt} artifact")
    return data
