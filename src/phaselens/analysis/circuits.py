"""Circuits over training: how the circuit found at each checkpoint forms, when each edge is born, and
whether it stays (from the `circuits` probe's artifacts, `store.circuit_artifact`; torch-free).

With C_s the circuit at checkpoint s (its edges) and w_s(e) = |score_s(e)| for e in C_s, else 0:

    jaccard(s, t)          = |C_s ∩ C_t| / |C_s ∪ C_t|
    weighted_jaccard(s, t) = Σ_e min(w_s(e), w_t(e)) / Σ_e max(w_s(e), w_t(e))

`jaccard_prev` compares each checkpoint with the one measured before it, `jaccard_final` with the last one.
Their 95% confidence intervals (`_lo`, `_hi`) come from a bootstrap over the batch's sequences: the same
resample of sequences at every checkpoint (the probe batch is fixed), each edge's score recomputed from
its per-sequence shares, and the circuit of a resample = its top |C_s| edges (the faithful size found on
the whole batch; the faithfulness search is not rerun per resample). A checkpoint without a claimed
circuit (no clear clean/corrupt gap) has NaN there.

An edge's birth is the first checkpoint from which, at every later one, it is in the circuit and its
score exceeds half its final score (same sign); only edges of the final circuit are born.
`spearman_eap`, `spearman_eap_ig`: the rank correlation over all edges of EAP / EAP-IG with exact
patching, at each checkpoint where both ran.

`store_circuit_analysis(run)` writes all of it to the run's metrics as probe `circuits` (source
`checkpoint`), so reports, `Run.transitions()` and `phaselens export` read it like any metric; births are
rows `edge_birth:<edge>` at the birth step (value: the edge's final score). It is the one place these rows
are made: `phaselens probe` (`posthoc.runner`) calls it after every sweep that measured `circuits`, over
every checkpoint's artifact (a new checkpoint changes `jaccard_final` and the births everywhere). The
edges' own score series are the probe's rows `edge:<edge>` (`store.circuit_artifact.EDGE_METRIC`), one per
edge and checkpoint, so the transition detector finds an edge's rise like any metric's. The report's
circuits section (`report.circuits`) draws from the artifacts through the functions here, so it never
reads stale rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from phaselens.run import Run
from phaselens.store.circuit_artifact import CircuitArtifact, read_all_circuits
from phaselens.store.metrics import MetricsStore

PROBE = "circuits"
SOURCE = "checkpoint"
RESAMPLES = 200
CONFIDENCE = 0.95
BIRTH_PREFIX = "edge_birth:"
STABILITY = ("jaccard_prev", "jaccard_final", "weighted_jaccard_prev", "weighted_jaccard_final")
DERIVED = tuple(f"{m}{end}" for m in STABILITY for end in ("", "_lo", "_hi")) + ("spearman_eap", "spearman_eap_ig")
BIRTH_SE = 3.0  # an edge's birth is told only where its final score is this many standard errors from zero


def circuit_artifacts(run: Run) -> list[CircuitArtifact]:
    """The circuits probe's artifacts of `run`, by step (none before `phaselens probe RUN --probes circuits`)."""
    return read_all_circuits(run.dir.artifacts / PROBE)


def edge_scores(artifacts: list[CircuitArtifact], method: str | None = None) -> pd.DataFrame:
    """Step × edge scores by `method` (default: each checkpoint's circuit method), edges in graph order."""
    rows = {a.step: {e.edge: e.scores.get(method or a.circuit_method, np.nan) for e in a.edges} for a in artifacts}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    return frame.sort_index() if len(frame) else frame


def membership(artifacts: list[CircuitArtifact]) -> pd.DataFrame:
    """Step × edge: whether the edge is in that checkpoint's circuit."""
    frame = pd.DataFrame.from_dict({a.step: {e.edge: e.in_circuit for e in a.edges} for a in artifacts}, orient="index")
    return frame.sort_index().astype(bool) if len(frame) else frame


def score_se(shares: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Standard error over sequences of scores given by per-sequence shares (E, B) of a mean over predictions (B counts)."""
    B = shares.shape[1]
    if B < 2:
        return np.zeros(shares.shape[0])
    weights = counts / counts.sum()  # (B,)
    residual = shares - shares.sum(1, keepdims=True) * weights  # (E, B)
    return np.sqrt((residual ** 2).sum(1) * B / (B - 1))


@dataclass
class Birth:
    edge: str
    step: int
    final: float  # the edge's score at the last checkpoint
    final_se: float  # its standard error over sequences (0 where the artifact has no per-sequence split)

    @property
    def clear(self) -> bool:
        """Whether the final score stands out of its noise (`BIRTH_SE` standard errors)."""
        return self.final_se > 0 and abs(self.final) > BIRTH_SE * self.final_se


def edge_births(artifacts: list[CircuitArtifact]) -> list[Birth]:
    """Each final-circuit edge's birth step (module docstring), strongest final score first."""
    if not artifacts or not artifacts[-1].has_effect:
        return []
    scores, members = edge_scores(artifacts), membership(artifacts)
    last = artifacts[-1]
    se = _final_se(last)
    births = []
    for e, record in enumerate(last.edges):
        if not record.in_circuit:
            continue
        final = float(scores[record.edge].iloc[-1])
        holds = (np.sign(final) * scores[record.edge] > abs(final) / 2) & members[record.edge]  # (S,)
        # the first step from which it holds at every later step
        tail = holds.astype(int)[::-1].cummin()[::-1].astype(bool)
        born = tail[tail].index
        if len(born):
            births.append(Birth(record.edge, int(born[0]), final, float(se[e]) if len(se) else 0.0))
    return sorted(births, key=lambda b: -abs(b.final))


def _final_se(artifact: CircuitArtifact) -> np.ndarray:
    if not artifact.per_sequence:
        return np.zeros(0)
    return score_se(np.asarray(artifact.per_sequence, dtype=float), np.asarray(artifact.read_counts, dtype=float))


def _jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard of boolean membership (..., E) along the last axis; NaN where both are empty."""
    union = (a | b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, (a & b).sum(-1) / np.maximum(union, 1), np.nan)


def _weighted(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    top = np.maximum(wa, wb).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top > 0, np.minimum(wa, wb).sum(-1) / np.where(top > 0, top, 1), np.nan)


def circuit_stability(artifacts: list[CircuitArtifact], resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """jaccard_prev, jaccard_final and their weighted forms per step, with bootstrap bounds: step, metric, value."""
    if not artifacts:
        return pd.DataFrame(columns=["step", "metric", "value"])
    steps = [a.step for a in artifacts]
    scores = np.abs(np.array([[e.scores.get(a.circuit_method, np.nan) for e in a.edges] for a in artifacts]))  # (S, E)
    members = np.array([[e.in_circuit for e in a.edges] for a in artifacts])  # (S, E)
    claimed = np.array([a.has_effect and bool(m.any()) for a, m in zip(artifacts, members)])  # (S,)
    weights = np.where(members, scores, 0.0)
    boot = _bootstrap(artifacts, members, resamples, seed)  # (S, R, E) membership and weights, or None
    out: list[tuple[int, str, float]] = []
    final = len(artifacts) - 1
    for s, step in enumerate(steps):
        for name, other in (("prev", s - 1), ("final", final)):
            if other < 0:
                continue
            ok = claimed[s] and claimed[other]
            values = {"jaccard": _jaccard(members[s], members[other]), "weighted_jaccard": _weighted(weights[s], weights[other])}
            bounds = {}
            if boot is not None and ok:
                bm, bw = boot
                bounds = {"jaccard": _jaccard(bm[s], bm[other]), "weighted_jaccard": _weighted(bw[s], bw[other])}
            for kind, value in values.items():
                metric = f"{kind}_{name}"
                out.append((step, metric, float(value) if ok else np.nan))
                lo, hi = (np.nanquantile(bounds[kind], [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
                          if kind in bounds and np.isfinite(bounds[kind]).any() else (np.nan, np.nan))
                out += [(step, metric + "_lo", float(lo)), (step, metric + "_hi", float(hi))]
    return pd.DataFrame(out, columns=["step", "metric", "value"])


def _bootstrap(artifacts: list[CircuitArtifact], members: np.ndarray, resamples: int, seed: int):
    """Per step, the circuit membership (S, R, E) and weights of `resamples` resamples of the sequences; None
    when an artifact lacks the per-sequence split or the checkpoints read different sequences."""
    if any(not a.per_sequence for a in artifacts) or len({len(a.read_counts) for a in artifacts}) != 1:
        return None
    counts = np.asarray(artifacts[0].read_counts, dtype=float)  # (B,)
    if any(not np.array_equal(np.asarray(a.read_counts, dtype=float), counts) for a in artifacts):
        return None
    B = len(counts)
    picks = np.random.default_rng(seed).integers(0, B, size=(resamples, B))  # (R, B): the same resample at every step
    total = counts.sum()
    norm = total / counts[picks].sum(-1)  # (R,)
    S, E = members.shape
    boot_members = np.zeros((S, resamples, E), dtype=bool)
    boot_weights = np.zeros((S, resamples, E))
    for s, a in enumerate(artifacts):
        shares = np.asarray(a.per_sequence, dtype=float)  # (E, B)
        resampled = np.abs(shares[:, picks].sum(-1) * norm).T  # (R, E)
        size = int(members[s].sum())
        if size == 0:
            continue
        top = np.argsort(-resampled, axis=1)[:, :size]  # (R, size)
        np.put_along_axis(boot_members[s], top, True, axis=1)
        boot_weights[s] = np.where(boot_members[s], resampled, 0.0)
    return boot_members, boot_weights


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN where either side is constant."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def method_agreement(artifacts: list[CircuitArtifact]) -> pd.DataFrame:
    """Spearman over all edges of EAP and EAP-IG against exact, per step where both ran: step, method, spearman."""
    rows = []
    for a in artifacts:
        if "exact" not in a.methods:
            continue
        exact = np.array([e.scores["exact"] for e in a.edges])
        for method in ("eap", "eap_ig"):
            if method in a.methods:
                rows.append((a.step, method, spearman(exact, np.array([e.scores[method] for e in a.edges]))))
    return pd.DataFrame(rows, columns=["step", "method", "spearman"])


def store_circuit_analysis(run: Run) -> int:
    """Recompute the over-training rows (module docstring) from the artifacts and store them; returns how many."""
    artifacts = circuit_artifacts(run)
    rows = [(int(r.step), PROBE, r.metric, None, None, float(r.value), SOURCE) for r in circuit_stability(artifacts).itertuples()]
    rows += [(int(r.step), PROBE, f"spearman_{r.method}", None, None, float(r.spearman), SOURCE)
             for r in method_agreement(artifacts).itertuples()]
    rows += [(b.step, PROBE, BIRTH_PREFIX + b.edge, None, None, b.final, SOURCE) for b in edge_births(artifacts)]
    store = MetricsStore(run.dir.metrics_db)
    try:
        store.delete_metrics(PROBE, SOURCE, names=DERIVED, prefixes=(BIRTH_PREFIX,))
        store.write(rows)
    finally:
        store.close()
    return len(rows)
