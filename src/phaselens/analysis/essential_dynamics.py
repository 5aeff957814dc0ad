"""Essential dynamics: the PCA trajectory of a model's outputs across checkpoints, against a random-walk null.

Each checkpoint's output vector x_t (D,) is recorded by the `essential_dynamics` probe. Across the n
checkpoints, the vectors are centred (the mean over checkpoints removed) and decomposed; PC k's coordinate
of checkpoint t is y_t,k and its explained-variance fraction λ_k / Σ λ.

Turning strength at checkpoint t (degrees, 0 = straight on, 180 = back the way it came): the angle between
the chords y_t − y_{t−w} and y_{t+w} − y_t in the space of the top `dims` components (w = `window`).

A random walk is not a trajectory with stages, yet its PCA gives smooth Lissajous-like curves whose
component k explains 6/(π²k²) of the variance (Antognini & Sohl-Dickstein 2018), so a turn is read as a
stage only beyond that null: `walks` seeded random walks with the trajectory's own length, step lengths
(‖x_{t+1} − x_t‖, in random directions) and dimension (capped at 4n: a walk of n steps spans at most n − 1
of them) are put through the same PCA and turning measure, and a checkpoint is a turning point when its
turning strength exceeds the null's (1 − α/m) quantile at that checkpoint (m interior checkpoints: a
family-wise false-alarm rate of α over the whole trajectory) and is the largest within its window.

Where results live: per-checkpoint vectors in `artifacts/essential_dynamics/`, the PCA in
`artifacts/essential_dynamics_pca/` (`store.essential_dynamics`), and `pc1`, `pc2`, `pc3`, `turning`,
`turning_null` rows (source "checkpoint") in metrics.sqlite. `update_essential_dynamics` (re)computes them;
`phaselens probe` calls it whenever the set of measured checkpoints differs from the stored PCA's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from phaselens.errors import RunError
from phaselens.store.essential_dynamics import (PROBE, EssentialDynamicsError, Trajectory, read_outputs, read_trajectory,
                                                write_trajectory)
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir

SOURCE = "checkpoint"
MEASURED = "logprob_mean"  # the probe's own row: which checkpoints have a vector
SERIES_METRICS = ("pc1", "pc2", "pc3", "turning", "turning_null")
MIN_CHECKPOINTS = 3  # a turn needs a step before and a step after
COMPONENTS_KEPT = 10  # explained-variance fractions stored


@dataclass(frozen=True)
class NullSettings:
    """How the random-walk null is simulated and read."""

    walks: int = 2000
    seed: int = 0
    alpha: float = 0.05  # family-wise: the chance that a random walk shows a turning point anywhere
    window: int = 1
    dims: int = 3


def random_walk_fraction(k: int) -> float:
    """The share of variance a long random walk's PC k explains: 6/(π²k²) (Antognini & Sohl-Dickstein 2018)."""
    return 6.0 / (math.pi ** 2 * k ** 2)


def pca_over_checkpoints(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates and explained-variance fractions of the centred rows: vectors (..., n, D) -> ((..., n, n), (..., n)).

    Through the n × n Gram matrix (n checkpoints ≪ D outputs); components in order of variance, each signed so
    the trajectory ends on its positive side of where it began.
    """
    centred = vectors - vectors.mean(axis=-2, keepdims=True)  # (..., n, D)
    gram = centred @ np.swapaxes(centred, -1, -2)  # (..., n, n)
    eigenvalues, eigenvectors = np.linalg.eigh(gram)  # ascending
    eigenvalues, eigenvectors = np.clip(eigenvalues[..., ::-1], 0, None), eigenvectors[..., ::-1]  # (..., n), (..., n, n)
    coords = eigenvectors * np.sqrt(eigenvalues)[..., None, :]  # (..., n, n): y_t,k
    sign = np.where(coords[..., -1, :] - coords[..., 0, :] < 0, -1.0, 1.0)  # (..., n)
    total = eigenvalues.sum(axis=-1, keepdims=True)  # (..., 1)
    return coords * sign[..., None, :], eigenvalues / np.where(total > 0, total, 1.0)


def turning_strength(coords: np.ndarray, window: int = 1) -> np.ndarray:
    """Angle in degrees between the chords into and out of each checkpoint: coords (..., n, k) -> (..., n), NaN
    within `window` of either end and where a chord has no length."""
    n = coords.shape[-2]
    out = np.full(coords.shape[:-1], np.nan)
    if n <= 2 * window:
        return out
    before = coords[..., window:n - window, :] - coords[..., : n - 2 * window, :]  # (..., n-2w, k)
    after = coords[..., 2 * window:, :] - coords[..., window:n - window, :]
    norms = np.linalg.norm(before, axis=-1) * np.linalg.norm(after, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.clip((before * after).sum(-1) / norms, -1.0, 1.0)
    out[..., window:n - window] = np.where(norms > 0, np.degrees(np.arccos(cosine)), np.nan)
    return out


def random_walks(step_lengths: np.ndarray, dimension: int, walks: int, rng: np.random.Generator) -> np.ndarray:
    """Random walks that take steps of the given lengths in uniformly random directions: -> (walks, n, dimension)."""
    directions = rng.standard_normal((walks, len(step_lengths), dimension))  # (W, n-1, d)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    steps = directions * step_lengths[None, :, None]
    start = np.zeros((walks, 1, dimension))
    return np.concatenate([start, np.cumsum(steps, axis=1)], axis=1)  # (W, n, d)


def null_turning(step_lengths: np.ndarray, dimension: int, settings: NullSettings, chunk: int = 250
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The null's turning strengths (walks, n) and its mean explained-variance fractions (n,)."""
    rng = np.random.default_rng(settings.seed)
    n = len(step_lengths) + 1
    dims = min(settings.dims, n - 1)
    strengths, fractions = [], []
    for start in range(0, settings.walks, chunk):
        walks = random_walks(step_lengths, dimension, min(chunk, settings.walks - start), rng)
        coords, explained = pca_over_checkpoints(walks)
        strengths.append(turning_strength(coords[..., :dims], settings.window))
        fractions.append(explained)
    return np.concatenate(strengths), np.concatenate(fractions).mean(axis=0)


def turning_points(strength: np.ndarray, threshold: np.ndarray, window: int = 1) -> list[int]:
    """Indices where the strength beats the null's threshold and is the largest within `window` on either side."""
    points = []
    for i in np.flatnonzero(np.nan_to_num(strength, nan=-1.0) > np.nan_to_num(threshold, nan=np.inf)):
        near = strength[max(0, i - window): i + window + 1]
        if strength[i] >= np.nanmax(near):
            points.append(int(i))
    return points


def essential_trajectory(steps: list[int], vectors: np.ndarray, output: str = "logprob",
                         settings: NullSettings = NullSettings()) -> Trajectory:
    """The PCA trajectory of `vectors` (n, D), one row per checkpoint in `steps`, with its turning points beyond the null."""
    n, dimension = vectors.shape
    if n < MIN_CHECKPOINTS:
        raise RunError(f"essential dynamics needs at least {MIN_CHECKPOINTS} measured checkpoints, this run has {n}")
    if not np.isfinite(vectors).all():
        raise RunError("essential dynamics: a checkpoint's output vector holds NaN or inf (a diverged checkpoint); "
                       "measure the run without it (--steps)")
    vectors = vectors.astype(np.float64)
    coords, explained = pca_over_checkpoints(vectors)
    dims = min(settings.dims, n - 1)
    strength = turning_strength(coords[:, :dims], settings.window)  # (n,)
    step_lengths = np.linalg.norm(np.diff(vectors, axis=0), axis=1)  # (n-1,)
    null, null_fractions = null_turning(step_lengths, min(dimension, 4 * n), settings)
    interior = int(np.isfinite(strength).sum())
    level = 1.0 - settings.alpha / max(interior, 1)
    with np.errstate(invalid="ignore"):
        threshold = np.array([np.nanquantile(column, level) if np.isfinite(column).any() else np.nan for column in null.T])
    kept = min(COMPONENTS_KEPT, n - 1)
    shown = np.zeros((n, 3))
    shown[:, : min(3, n)] = coords[:, :3]

    def listed(values: np.ndarray) -> list[float | None]:
        return [None if not np.isfinite(v) else round(float(v), 4) for v in values]

    return Trajectory(steps=[int(s) for s in steps], dimension=int(dimension), output=output,
                      explained=[round(float(v), 6) for v in explained[:kept]],
                      null_explained=[round(random_walk_fraction(k), 6) for k in range(1, kept + 1)],
                      matched_null_explained=[round(float(v), 6) for v in null_fractions[:kept]],
                      coords=[[round(float(v), 6) for v in row] for row in shown], turning=listed(strength),
                      threshold=listed(threshold),
                      turning_points=[int(steps[i]) for i in turning_points(strength, threshold, settings.window)],
                      null={"walks": settings.walks, "seed": settings.seed, "alpha": settings.alpha,
                            "window": settings.window, "dims": dims, "walk_dimension": int(min(dimension, 4 * n)),
                            "quantile": round(level, 6)})


def measured_steps(store: MetricsStore) -> list[int]:
    """The checkpoints the probe has measured (its `logprob_mean` rows)."""
    rows = store.read(probe=PROBE, metric=MEASURED, source=SOURCE)
    return sorted(int(s) for s in rows["step"].unique())


def trajectory_of(run: Path | str, steps: list[int], settings: NullSettings = NullSettings()) -> Trajectory:
    """The trajectory of the output vectors stored at `steps` (they must all be of one kind and size)."""
    vectors = read_outputs(run, steps)
    missing = sorted(set(steps) - {v.step for v in vectors})
    if missing:
        raise EssentialDynamicsError(f"{RunDir(run).artifacts / PROBE} has no output vector for step(s) {missing}; "
                                     f"measure them again with `phaselens probe {run} --probes {PROBE} --remeasure`")
    kinds = {(v.output, len(v.values), tuple(v.vocab or ())) for v in vectors}
    if len(kinds) > 1:
        raise EssentialDynamicsError(f"{RunDir(run).artifacts / PROBE}: the checkpoints were measured with different "
                                     f"options ({len(kinds)} kinds of vector); measure them again with --remeasure")
    return essential_trajectory(steps, np.array([v.values for v in vectors]), vectors[0].output, settings)


def trajectory_rows(trajectory: Trajectory) -> list[tuple]:
    """Metric rows (step, probe, metric, layer, head, value, source) of a trajectory."""
    rows = []
    for i, step in enumerate(trajectory.steps):
        for k in range(3):
            rows.append((step, PROBE, f"pc{k + 1}", None, None, trajectory.coords[i][k], SOURCE))
        for metric, values in (("turning", trajectory.turning), ("turning_null", trajectory.threshold)):
            if values[i] is not None:
                rows.append((step, PROBE, metric, None, None, values[i], SOURCE))
    return rows


def update_essential_dynamics(run: Path | str, force: bool = False) -> Trajectory | None:
    """(Re)compute the PCA over every measured checkpoint and store its rows and artifact, when the measured
    checkpoints differ from the stored PCA's (or `force`); None when fewer than three are measured."""
    run_dir = RunDir(run)
    store = MetricsStore(run_dir.metrics_db)
    try:
        steps = measured_steps(store)
        stored = read_trajectory(run_dir.path)
        if len(steps) < MIN_CHECKPOINTS:
            return None
        if stored is not None and stored.steps == steps and not force:
            return stored
        trajectory = trajectory_of(run_dir.path, steps)
        store.delete_metrics(PROBE, SOURCE, names=SERIES_METRICS)  # the whole series is recomputed
        store.write(trajectory_rows(trajectory))
        write_trajectory(run_dir.path, trajectory)
        return trajectory
    finally:
        store.close()


def current_trajectory(run) -> tuple[Trajectory | None, bool]:
    """(trajectory, stored) of a `Run` for its readers: the stored PCA when it covers every measured checkpoint,
    else one computed now from the vectors (not stored: readers do not write); None before three are measured."""
    rows = run.metrics(probe=PROBE, metric=MEASURED, source=SOURCE)
    steps = sorted(int(s) for s in rows["step"].unique())
    if len(steps) < MIN_CHECKPOINTS:
        return None, False
    stored = read_trajectory(run.path)
    if stored is not None and stored.steps == steps:
        return stored, True
    return trajectory_of(run.path, steps), False


def nearest_distances(points: list[int], targets: list[int], steps: list[int]) -> list[tuple[int, int | None, int | None]]:
    """For each step in `points`: the nearest step of `targets` and the distance between them in checkpoints
    (positions in `steps`, a step between two checkpoints counted at the nearer); (point, None, None) without targets."""
    order = np.asarray(sorted(steps))

    def position(step: int) -> int:
        return int(np.argmin(np.abs(order - step)))

    out = []
    for p in points:
        if not targets:
            out.append((p, None, None))
            continue
        best = min(targets, key=lambda t: (abs(position(t) - position(p)), abs(t - p)))
        out.append((p, int(best), abs(position(best) - position(p))))
    return out


def turning_frame(trajectory: Trajectory) -> pd.DataFrame:
    """step, pc1, pc2, pc3, turning, threshold, beyond (a turning point) per checkpoint."""
    frame = pd.DataFrame(trajectory.coords, columns=["pc1", "pc2", "pc3"])
    frame.insert(0, "step", trajectory.steps)
    frame["turning"] = pd.array(trajectory.turning, dtype="Float64")
    frame["threshold"] = pd.array(trajectory.threshold, dtype="Float64")
    frame["beyond"] = frame["step"].isin(trajectory.turning_points)
    return frame
