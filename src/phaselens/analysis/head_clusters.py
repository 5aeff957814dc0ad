"""Heads grouped by the shape of their weight-refined LLC curves (Wang et al. 2024).

Each head's rLLC curve (the `llc` probe with `components=heads`) is read on a log-step axis (the
checkpoints resampled at evenly spaced log(1 + step)), then standardized (mean 0, std 1), so only its
shape counts: when it rises, plateaus or falls, not its level. The curves are grouped two ways:

* k-means (k-means++ seeding, a fixed seed, several restarts), k in 2..min(heads − 1, MAX_K) chosen by
  the mean silhouette s = (b − a) / max(a, b), a the mean distance to the own cluster, b to the nearest
  other one; a single cluster when no k reaches MIN_SILHOUETTE with cluster means at least
  MIN_SEPARATION apart (RMS over the axis, in units of each curve's std: same-shaped curves stay one);
* average-linkage hierarchical clustering of the Euclidean distances, with the merge heights the
  dendrogram draws.

Each head carries its head-score role (the final level of its `heads` scores: previous-token,
induction, duplicate, where that level passes ROLE_THRESHOLD), so the report can say whether heads of
one role share a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from phaselens.signals.levels import final_level

MAX_K = 6
MIN_SILHOUETTE = 0.25  # below it no grouping is better than one cluster
MIN_SEPARATION = 0.25  # ... nor one whose cluster means differ by less than 0.25 std per point (RMS)
ROLE_THRESHOLD = 0.3  # a head's final score must reach this to carry the role
ROLES = ("prev_token", "induction", "duplicate")
GRID = 32  # points of the log-step axis
RESTARTS = 10


@dataclass
class HeadClusters:
    """The grouping of heads by rLLC-curve shape."""

    heads: list[str]  # "L1H0", ...
    curves: np.ndarray  # (heads, GRID) standardized curves on the log-step axis
    labels: list[int]  # k-means cluster per head (0-based)
    k: int
    silhouette: float  # mean silhouette at the chosen k (NaN with one cluster)
    merges: list[tuple[int, int, float, int]] = field(default_factory=list)  # hierarchical: (a, b, height, size)
    roles: dict[str, str] = field(default_factory=dict)  # head -> role from its head scores ("" if none)

    def groups(self) -> list[list[str]]:
        """The clusters as lists of head names, largest first."""
        out = [[h for h, label in zip(self.heads, self.labels) if label == c] for c in range(self.k)]
        return sorted((g for g in out if g), key=lambda g: (-len(g), g))


def log_step_curves(curves: pd.DataFrame, grid: int = GRID) -> np.ndarray:
    """Each column of `curves` (steps × heads) resampled at `grid` evenly spaced log(1 + step), standardized: (heads, grid)."""
    steps = np.log1p(curves.index.to_numpy(dtype=float))  # (n,)
    axis = np.linspace(steps[0], steps[-1], grid)  # (grid,)
    out = []
    for name in curves.columns:
        values = curves[name].to_numpy(dtype=float)
        ok = np.isfinite(values)
        resampled = np.interp(axis, steps[ok], values[ok]) if ok.sum() >= 2 else np.zeros(grid)
        spread = resampled.std()
        out.append((resampled - resampled.mean()) / spread if spread > 0 else np.zeros(grid))
    return np.array(out)


def _distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of x (n, d): (n, n)."""
    squared = (x ** 2).sum(1)
    return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0))


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = RESTARTS, iterations: int = 100) -> np.ndarray:
    """Cluster labels (n,) of the rows of x (n, d): Lloyd's algorithm from k-means++ seeds, the best of `restarts`."""
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):  # k-means++: the next centre drawn with probability ∝ squared distance
            d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
            centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
        centres = np.array(centres)  # (k, d)
        for _ in range(iterations):
            labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)  # (n,)
            moved = np.array([x[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
            if np.allclose(moved, centres):
                break
            centres = moved
        cost = float(((x - centres[labels]) ** 2).sum())
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return best


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a clustering (NaN with fewer than two clusters); a head alone in its cluster scores 0."""
    clusters = np.unique(labels)
    if len(clusters) < 2:
        return float("nan")
    d = _distances(x)
    scores = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            scores.append(0.0)
            continue
        a = d[i, own & (np.arange(len(x)) != i)].mean()
        b = min(d[i, labels == c].mean() for c in clusters if c != labels[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def average_linkage(x: np.ndarray) -> list[tuple[int, int, float, int]]:
    """Hierarchical clustering of the rows of x (n, d), average linkage: merges (a, b, height, size) in order,
    the leaves 0..n−1 and merge j forming cluster n + j (scipy's linkage-matrix convention)."""
    d = _distances(x)
    members = {i: [i] for i in range(len(x))}
    merges = []
    while len(members) > 1:
        ids = sorted(members)
        pairs = [(np.mean(d[np.ix_(members[a], members[b])]), a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
        height, a, b = min(pairs)
        new = len(x) + len(merges)
        members[new] = members.pop(a) + members.pop(b)
        merges.append((a, b, float(height), len(members[new])))
    return merges


def head_roles(metrics: pd.DataFrame) -> dict[str, str]:
    """Each head's role: the head score (previous-token, induction, duplicate) with the highest final level at or
    above ROLE_THRESHOLD, from the checkpoint rows where there are any, else the live ones."""
    rows = metrics[metrics["probe"] == "heads"]
    if rows.empty:
        return {}
    source = "checkpoint" if (rows["source"] == "checkpoint").any() else "live"
    rows = rows[rows["source"] == source]
    roles: dict[str, tuple[float, str]] = {}
    for (metric, layer, head), series in rows.groupby(["metric", "layer", "head"]):
        if metric not in ROLES:
            continue
        level = final_level(series.sort_values("step")["value"].to_numpy())
        name = f"L{int(layer)}H{int(head)}"
        if level >= ROLE_THRESHOLD and level > roles.get(name, (-np.inf, ""))[0]:
            roles[name] = (level, metric)
    return {name: role for name, (_, role) in roles.items()}


def cluster_heads(curves: pd.DataFrame, roles: dict[str, str] | None = None, seed: int = 0) -> HeadClusters | None:
    """Group the heads of `curves` (steps × "L{l}H{h}" rLLC columns) by the shape of their curves; None with
    fewer than three heads or three checkpoints."""
    curves = curves.dropna(axis=1, how="all").sort_index()
    if curves.shape[1] < 3 or curves.shape[0] < 3:
        return None
    x = log_step_curves(curves)
    heads = [str(c) for c in curves.columns]
    best = (np.zeros(len(heads), dtype=int), 1, float("nan"))
    for k in range(2, min(len(heads) - 1, MAX_K) + 1):
        labels = kmeans(x, k, seed)
        score = silhouette(x, labels)
        means = np.array([x[labels == c].mean(0) for c in np.unique(labels)])  # (k, GRID)
        apart = _distances(means)[np.triu_indices(len(means), 1)].max() / math.sqrt(x.shape[1])
        if apart >= MIN_SEPARATION and score >= MIN_SILHOUETTE and not score <= (best[2] if np.isfinite(best[2]) else -np.inf):
            best = (labels, k, score)
    labels, k, score = best
    order = {c: i for i, c in enumerate(dict.fromkeys(labels))}  # clusters numbered by their first head
    return HeadClusters(heads, x, [order[c] for c in labels], k, score, average_linkage(x),
                        {h: (roles or {}).get(h, "") for h in heads})
