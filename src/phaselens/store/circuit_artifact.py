"""The circuits artifact `phaselens.circuits/1`: written by the `circuits` probe at every checkpoint it measures,
read by `Run.edges()`, the over-training analysis and the report, through this one typed reader and writer
(torch-free).

    RUN/artifacts/circuits/step_<S>.json
    {"format": "phaselens.circuits/1", "step": S | null, "methods": ["exact", "eap", "eap_ig"],
     "steps": m (EAP-IG interpolation steps), "circuit_method": method the circuit was found with,
     "threshold": 0.8, "metric_clean": m(clean), "metric_corrupt": m(corrupt), "faithfulness": f,
     "pairs": {"patch": token set corrupted, "read": prediction set read, "corrupt": "fresh" | "partner" | "rolled",
               "seed": s, "sequences": B, "rows": rows asked for},
     "edges": [{"edge": "L0H1->L1H0.k", "upstream": "L0H1", "downstream": "L1H0", "input": "k" | "q" | "v" | "mlp" | "logits",
                "scores": {method: score}, "in_circuit": bool}],
     "has_effect": bool (the clean/corrupt gap is clear; else faithfulness is NaN and no edge is in the circuit),
     "effect_se": standard error of that gap over the sequences,
     "read_counts": [B] predictions read per sequence,
     "per_sequence": [E][B] the circuit method's scores split by sequence (rows summing to the scores), in edge order}

A score is metric(edge patched to corrupt) − metric(clean) (exact) or its first-order estimate (eap, eap_ig):
positive where the edge carries what lowers the loss. The last four keys are absent from artifacts written
before they existed (read as has_effect = true, no split).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from phaselens.store.atomic import read_json, write_json
from phaselens.store.neuron_artifact import ArtifactError

CIRCUITS_FORMAT = "phaselens.circuits/1"
EDGE_METRIC = "edge:"  # metric name prefix of an edge's score series, probe `circuits`: "edge:L0H1->L1H0.k"
_STEP_FILE = re.compile(r"^step_(\d{8,})\.json$")


@dataclass
class EdgeRecord:
    edge: str
    upstream: str
    downstream: str
    input: str
    scores: dict[str, float]
    in_circuit: bool = False


@dataclass
class CircuitArtifact:
    """Every edge's scores at one checkpoint, and the circuit found there."""

    methods: list[str]
    steps: int
    circuit_method: str
    threshold: float
    metric_clean: float
    metric_corrupt: float
    faithfulness: float
    pairs: dict[str, Any]
    edges: list[EdgeRecord] = field(default_factory=list)
    step: int | None = None
    has_effect: bool = True
    effect_se: float = 0.0
    read_counts: list[int] = field(default_factory=list)  # (B,)
    per_sequence: list[list[float]] = field(default_factory=list)  # (E, B), or empty

    @property
    def circuit(self) -> list[str]:
        """The names of the circuit's edges."""
        return [e.edge for e in self.edges if e.in_circuit]

    def to_json(self) -> dict[str, Any]:
        return {"format": CIRCUITS_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any], origin: str = "circuits artifact") -> "CircuitArtifact":
        if not isinstance(raw, dict) or raw.get("format") != CIRCUITS_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ArtifactError(f"{origin}: not a {CIRCUITS_FORMAT} artifact (format {got!r})")
        try:
            edges = [EdgeRecord(**e) for e in raw["edges"]]
            fields = {k: raw[k] for k in ("methods", "steps", "circuit_method", "threshold", "metric_clean",
                                          "metric_corrupt", "faithfulness", "pairs")}
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{origin}: malformed {CIRCUITS_FORMAT} artifact ({exc})") from None
        optional = {k: raw[k] for k in ("has_effect", "effect_se", "read_counts", "per_sequence") if raw.get(k) is not None}
        return cls(**fields, edges=edges, step=raw.get("step"), **optional)


def write_circuits(path: Path, artifact: CircuitArtifact) -> None:
    """Write one checkpoint's artifact (atomically)."""
    write_json(path, artifact.to_json(), compact=True)


def read_circuits(path: Path) -> CircuitArtifact:
    """One checkpoint's artifact; its step from the file name where the file does not say it."""
    path = Path(path)
    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read the circuits artifact ({exc})") from None
    artifact = CircuitArtifact.from_json(raw, str(path))
    match = _STEP_FILE.match(path.name)
    if artifact.step is None and match:
        artifact.step = int(match.group(1))
    return artifact


def read_all_circuits(folder: Path) -> list[CircuitArtifact]:
    """Every checkpoint's artifact in `folder` (RUN/artifacts/circuits), by step; none when the probe never ran."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [read_circuits(p) for p in sorted(folder.iterdir()) if _STEP_FILE.match(p.name)]
    return sorted(found, key=lambda a: a.step if a.step is not None else -1)


def circuits_path(folder: Path, step: int) -> Path:
    """Where the artifact of checkpoint `step` lies in `folder` (RUN/artifacts/circuits)."""
    return Path(folder) / f"step_{step:08d}.json"


_NODE = re.compile(r"^L(\d+)(?:H(\d+)|(M))$")


def node_kind(name: str) -> tuple[str, int | None, int | None]:
    """("embed" | "head" | "mlp" | "logits", layer, head) of a circuits graph node's name: embed, L1H0, L0M, logits."""
    if name in ("embed", "logits"):
        return name, None, None
    match = _NODE.match(name)
    if match is None:
        raise ArtifactError(f"not a circuits graph node: {name!r}")
    layer, head, mlp = match.groups()
    return ("mlp", int(layer), None) if mlp else ("head", int(layer), int(head))


def graph_columns(names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Where each node of a circuits graph sits: name -> (column, row). Columns left to right: embed, layer 0's heads
    (row = head), layer 0's MLP where the model has one, layer 1's heads, ..., logits; no empty columns."""
    def place(name: str) -> tuple[float, int]:
        kind, layer, head = node_kind(name)
        if kind in ("embed", "logits"):
            return (-1.0 if kind == "embed" else float("inf")), 0
        assert layer is not None
        return (2.0 * layer, head) if head is not None else (2.0 * layer + 1, 0)

    placed = {name: place(name) for name in names}
    dense = {c: i for i, c in enumerate(sorted({c for c, _ in placed.values()}))}
    return {name: (dense[c], row) for name, (c, row) in placed.items()}


def measured_steps(folder: Path) -> list[int]:
    """The steps with an artifact in `folder`, without reading them (none when the probe never ran)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, (p.name for p in folder.iterdir())) if m)
