"""The `circuits` probe: edge attribution on the study's clean/corrupt pairs, and the faithful circuit.

Pairs come from the batch the probe reads, by the position sets its options name (the study declares
them, with how to corrupt): the corrupted input has the token set `patch` replaced, by `corrupt`:

    fresh    fresh ordinary tokens, seeded, each different from the one it replaces
             (induction batch: the first copy of the segment; text runs read the induction batch)
    partner  the paired row's tokens (`TaskBatch.pair_index`; late disambiguation: z swapped between
             two examples of the same B)
    rolled   the next row's tokens (grokking: one operand changed)

The metric is the mean loss of the clean tokens at the prediction set `read` (copy-position loss,
first-target loss, answer loss). `rows` sequences are read, spread evenly over the batch. Edge
scores, methods and the circuit are those of `probes.edge_graph`.

Metrics: `circuit_size` and `faithfulness` (the smallest top-n edge set whose faithfulness reaches
`threshold`; NaN where the pairs show no clear effect, `GraphScores.has_effect`), `metric_clean`,
`metric_corrupt`, `node_score` per head (L, H): the summed scores of the head's outgoing edges, and
`edge:<name>` per edge (its score by the circuit's method, so edges are series the transition detector
reads). Every edge's scores, split by sequence too, go to the artifact (`store.circuit_artifact`), read
back by `Run.edges()` and `analysis.circuits`.
"""

from __future__ import annotations

from typing import Any

import torch

from phaselens.models.adapter import ModelAdapter
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
from phaselens.probes.edge_graph import METHODS, EdgeGraph, GraphScores, Pairs
from phaselens.store.circuit_artifact import EDGE_METRIC, CircuitArtifact, EdgeRecord
from phaselens.tasks.batch import TaskBatch

CHOICES = ("auto", *METHODS)
CORRUPTIONS = ("fresh", "partner", "rolled")


def fresh_tokens(tokens: torch.Tensor, positions: torch.Tensor, ids: list[int], seed: int) -> torch.Tensor:
    """Tokens (B, T) with every position in `positions` (B, T) replaced by a random id of `ids` other than the one there."""
    pool = torch.as_tensor(ids, dtype=torch.long)  # (n,)
    rng = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, len(pool) - 1, tokens.shape, generator=rng)  # (B, T): n−1 choices, skipping the original
    where = torch.searchsorted(pool, tokens.cpu().clamp(max=int(pool.max())))  # the original's index in the sorted pool
    original_in_pool = pool[where.clamp(max=len(pool) - 1)] == tokens.cpu()
    draw = torch.where(original_in_pool & (draw >= where), draw + 1, draw)
    return torch.where(positions, pool[draw].to(tokens.device), tokens)


def study_pairs(batch: TaskBatch, patch: str, read: str, ids: list[int], seed: int, rows: int = 0,
                corrupt: str = "fresh") -> Pairs:
    """The clean/corrupt pairs a study's position sets declare, on `rows` sequences of `batch` (0: all).

    fresh and rolled read `rows` sequences spread evenly over the batch (a batch in id order, as grokking's grid,
    is sampled across); partner reads the first `rows`, which keeps pairs together, and drops rows without one.
    """
    if corrupt not in CORRUPTIONS:
        raise ValueError(f"circuits corrupt must be one of {CORRUPTIONS}, got {corrupt!r}")
    n = min(rows or len(batch), len(batch))
    stride = 1 if corrupt == "partner" else max(1, len(batch) // n)
    picked = batch.rows(slice(0, stride * n, stride))
    positions = picked.token_positions(patch, "circuits")  # (B, T)
    read_mask = picked.predictions(read, "circuits")  # (B, T-1)
    if corrupt == "fresh":
        corrupted = fresh_tokens(picked.tokens, positions, sorted(ids), seed)
    elif corrupt == "rolled":
        corrupted = picked.rolled(patch, "circuits")
    else:
        if picked.pair_index is None:
            raise ValueError("circuits corrupt=partner needs a batch that pairs its rows; this batch does not")
        keep = (picked.pair_index >= 0).nonzero().flatten()  # (B',)
        partner = picked.pair_index.clamp(min=0)
        corrupted = torch.where(positions, picked.tokens[partner], picked.tokens)[keep]
        return Pairs(picked.tokens[keep], corrupted, read_mask[keep])
    return Pairs(picked.tokens, corrupted, read_mask)


@register_probe
class CircuitsProbe(Probe):
    """Edge scores (exact, EAP, EAP-IG) and the circuit with faithfulness ≥ `threshold` (see module docstring).

    Options: `patch`, `read` (position sets, the study's), `corrupt` (fresh | partner | rolled), `seed`;
    `method` auto | exact | eap | eap_ig (auto:
    every method where the graph has at most `exact_limit` edges, the circuit from exact; EAP and EAP-IG
    otherwise, the circuit from EAP-IG); `steps`, EAP-IG's interpolation steps; `threshold`; `rows`, the
    sequences used (0: all); `chunk`, sequences per batched patched forward; `every`, live only: measure every
    this many steps (`telemetry.probes` with circuits; at checkpoints and post-hoc: always).
    """

    name = "circuits"
    # A backward and a forward per edge: live, it is measured every `every` steps on a copy of the weights, on
    # the batch it reads at checkpoints, off the training step (`Probe.live_on_copy`, `probes.live`).
    needs = Needs(parts=frozenset({"edge_graph"}), position_options=("patch", "read"), batch="induction")
    live_on_copy = True
    checkpoint_artifacts = True  # `Run.edges()`, the report and the dashboard read the artifact: training writes it too

    def __init__(self, patch: str | None = None, read: str | None = None, seed: int = 0, method: str = "auto",
                 steps: int = 5, threshold: float = 0.8, exact_limit: int = 400, rows: int = 32, chunk: int = 2048,
                 corrupt: str = "fresh", every: int = 100):
        if int(every) < 1:
            raise ValueError(f"circuits every must be >= 1, got {every}")
        if method not in CHOICES:
            raise ValueError(f"circuits method must be one of {CHOICES}, got {method!r}")
        if corrupt not in CORRUPTIONS:
            raise ValueError(f"circuits corrupt must be one of {CORRUPTIONS}, got {corrupt!r}")
        if int(steps) < 1:
            raise ValueError(f"circuits steps must be >= 1, got {steps}")
        if not 0 < float(threshold) <= 1:
            raise ValueError(f"circuits threshold must be in (0, 1], got {threshold}")
        super().__init__(patch=patch, read=read, seed=seed, method=method, steps=int(steps), threshold=float(threshold),
                         exact_limit=int(exact_limit), rows=int(rows), chunk=int(chunk), corrupt=corrupt)
        self.every = int(every)  # not an option of the measurement: the values do not depend on it
        self._last: tuple[Any, tuple[GraphScores, list[int], float]] | None = None

    def hook_names(self, adapter: ModelAdapter) -> list[str]:
        return []  # it runs its own patched forwards

    def methods(self, graph: EdgeGraph) -> tuple[tuple[str, ...], str]:
        """The methods measured on `graph`, and the one the circuit is found with."""
        method = self.options["method"]
        if method != "auto":
            return (method,), method
        if len(graph) <= self.options["exact_limit"]:
            return METHODS, "exact"
        return ("eap", "eap_ig"), "eap_ig"

    def _measure(self, inputs: ProbeInputs) -> tuple[GraphScores, list[int], float]:
        if self._last is not None and self._last[0] is inputs:
            return self._last[1]
        opts = self.options
        if not (opts["patch"] and opts["read"]):
            raise ValueError("circuits needs options patch (a token set) and read (a prediction set); this task declares none: "
                             "set them, e.g. --probe-option circuits.patch=source --probe-option circuits.read=copy")
        adapter = inputs.adapter
        pairs = study_pairs(inputs.batch, opts["patch"], opts["read"], adapter.tokenizer.ordinary_ids(), opts["seed"], opts["rows"],
                            opts["corrupt"])
        graph = EdgeGraph(adapter)
        methods, chosen = self.methods(graph)
        with torch.inference_mode(False):
            scores = graph.scores(pairs, methods, opts["steps"], opts["chunk"])
            circuit, faithfulness = scores.circuit(chosen, opts["threshold"], rows=opts["chunk"])
        self._last = (inputs, (scores, circuit, faithfulness))
        return self._last[1]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        scores, circuit, faithfulness = self._measure(inputs)
        graph, chosen = scores.graph, self.methods(scores.graph)[1]
        a = inputs.adapter
        node = torch.zeros(a.n_layers, a.n_heads)
        values = scores.by_method[chosen].tolist()
        for edge, value in zip(graph.edges, values):
            if edge.upstream.startswith("L") and "H" in edge.upstream:
                layer, head = edge.upstream[1:].split("H")
                node[int(layer), int(head)] += value
        size = float(len(circuit)) if scores.has_effect else float("nan")
        return [Measurement("circuit_size", torch.tensor(size)),
                Measurement("faithfulness", torch.tensor(faithfulness)),
                Measurement("metric_clean", torch.tensor(scores.clean_loss)),
                Measurement("metric_corrupt", torch.tensor(scores.corrupt_loss)),
                Measurement("node_score", node),
                *(Measurement(EDGE_METRIC + edge.name, torch.tensor(value)) for edge, value in zip(graph.edges, values))]

    def artifact(self, inputs: ProbeInputs) -> dict[str, Any]:
        scores, circuit, faithfulness = self._measure(inputs)
        graph, opts = scores.graph, self.options
        methods, chosen = self.methods(graph)
        values = {m: s.tolist() for m, s in scores.by_method.items()}
        members = set(circuit)
        edges = [EdgeRecord(e.name, e.upstream, e.downstream, e.input.kind, {m: values[m][i] for m in methods}, i in members)
                 for i, e in enumerate(graph.edges)]
        pairs = {"patch": opts["patch"], "read": opts["read"], "corrupt": opts["corrupt"], "seed": opts["seed"],
                 "sequences": int(scores.pairs.clean.shape[0]), "rows": opts["rows"]}
        per_sequence = scores.per_sequence[chosen].tolist() if chosen in scores.per_sequence else []
        return CircuitArtifact(list(methods), opts["steps"], chosen, opts["threshold"], scores.clean_loss, scores.corrupt_loss,
                               faithfulness, pairs, edges, has_effect=scores.has_effect, effect_se=scores.effect_se,
                               read_counts=scores.pairs.counts.tolist(), per_sequence=per_sequence).to_json()
