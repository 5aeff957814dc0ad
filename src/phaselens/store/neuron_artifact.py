"""The neuron artifact `phaselens.neurons/1`: written by `phaselens neurons`, read by its report and
the dashboard, through this one typed reader and writer (torch-free).

    RUN/artifacts/neurons/step_<S>.json   (neurons.json beside a BDH checkpoint file)
    {"format": "phaselens.neurons/1", "step": S | null, "tokens": N, "threshold": t, "top_k": k,
     "window": w, "source": "what was streamed", "model": kind, "run" | "checkpoint": path,
     "stream": {"kind": "bytes" | "ids", "tokens": [N token ids]},
     "layers": [{"layer": l, "hook": name, "n_neurons": n,
                 "summary": {firing_rate_mean, frac_rare, frac_dead, selectivity_median, ..., "rate_quantiles": {q: v}},
                 "firing_rate": [n], "mean": [n], "max": [n], "selectivity": [n]   (null: never fired, or no value),
                 "top_values": [top_k][n], "top_positions": [top_k][n]              (position -1: empty slot),
                 "most_selective": [{"neuron": i, "firing_rate": r, "selectivity": s,
                                     "contexts": [{"value": v, "position": p, "before": text, "token": text, "after": text}]}]}]}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phaselens.errors import RunError
from phaselens.store.atomic import read_json, write_json

NEURON_FORMAT = "phaselens.neurons/1"
MIN_FIRING_TOKENS = 50
"""`most_selective` ranks only neurons that fired on at least this many tokens of the scan (and on at least
`top_k`, so their context lists fill). Below it, max / mean is set by a handful of activations just over the
threshold, and the 'most selective' neurons are near-dead ones whose contexts say nothing."""
Values = list  # one float (or None) per neuron


class ArtifactError(RunError):
    """An artifact file is missing, not JSON, or not in the format its reader expects."""


@dataclass
class NeuronContext:
    """One strong activation: its value, its offset in the stream, and the text around it."""

    value: float
    position: int
    before: str  # `window` tokens before the activating token
    token: str
    after: str  # window // 4 tokens after it


@dataclass
class SelectiveNeuron:
    neuron: int
    firing_rate: float
    selectivity: float
    contexts: list[NeuronContext] = field(default_factory=list)


@dataclass
class NeuronLayer:
    """Per-neuron statistics of one hooked layer."""

    layer: int
    hook: str
    n_neurons: int
    summary: dict[str, Any]  # firing_rate_mean, frac_rare, frac_dead, selectivity_median, rate_quantiles, ...
    firing_rate: Values
    mean: Values
    max: Values
    selectivity: Values
    top_values: list[Values]  # (top_k, n_neurons)
    top_positions: list[list[int]]  # (top_k, n_neurons)
    most_selective: list[SelectiveNeuron] = field(default_factory=list)

    STATISTICS = ("firing_rate", "mean", "max", "selectivity")  # the per-neuron lists a view can plot


@dataclass
class NeuronArtifact:
    """Everything one `phaselens neurons` scan found."""

    step: int | None
    tokens: int
    threshold: float
    top_k: int
    window: int
    source: str
    stream_kind: str  # "bytes" or "ids"
    stream_tokens: list[int]
    layers: list[NeuronLayer]
    origin: dict[str, Any] = field(default_factory=dict)  # model, and run or checkpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "format": NEURON_FORMAT, "step": self.step, "tokens": self.tokens, "threshold": self.threshold,
            "top_k": self.top_k, "window": self.window, "source": self.source, **self.origin,
            "stream": {"kind": self.stream_kind, "tokens": self.stream_tokens},
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> "NeuronArtifact":
        """Parse a `phaselens.neurons/1` document; ArtifactError naming `where` and the field at fault."""
        if not isinstance(data, dict) or data.get("format") != NEURON_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ArtifactError(f"{where} is not a {NEURON_FORMAT} artifact (format: {found!r})")
        try:
            stream = data["stream"]
            layers = [_layer(item) for item in data["layers"]]
            known = {"format", "step", "tokens", "threshold", "top_k", "window", "source", "stream", "layers"}
            return cls(step=_optional_int(data["step"]), tokens=int(data["tokens"]), threshold=float(data["threshold"]),
                       top_k=int(data["top_k"]), window=int(data["window"]), source=str(data["source"]),
                       stream_kind=str(stream["kind"]), stream_tokens=[int(t) for t in stream["tokens"]], layers=layers,
                       origin={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: malformed {NEURON_FORMAT} artifact ({type(exc).__name__}: {exc})") from exc


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _values(items: Any) -> Values:
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in items]


def _layer(item: dict[str, Any]) -> NeuronLayer:
    n = int(item["n_neurons"])
    values = {name: _values(item[name]) for name in NeuronLayer.STATISTICS}
    short = [name for name, v in values.items() if len(v) != n]
    if short:
        raise ValueError(f"layer {item.get('layer')}: {short} do not have one value per neuron ({n})")
    selective = [SelectiveNeuron(int(s["neuron"]), float(s["firing_rate"]), float(s["selectivity"]),
                                 [NeuronContext(float(c["value"]), int(c["position"]), str(c["before"]), str(c["token"]),
                                                str(c["after"])) for c in s["contexts"]])
                 for s in item["most_selective"]]
    return NeuronLayer(layer=int(item["layer"]), hook=str(item["hook"]), n_neurons=n, summary=dict(item["summary"]),
                       top_values=[_values(row) for row in item["top_values"]],
                       top_positions=[[int(p) for p in row] for row in item["top_positions"]],
                       most_selective=selective, **values)


def write_neuron_artifact(path: Path | str, artifact: NeuronArtifact) -> Path:
    """Write the artifact atomically (a reader never sees half of it)."""
    write_json(Path(path), artifact.to_json(), compact=True)
    return Path(path)


def read_neuron_artifact(path: Path | str, name: str | None = None) -> NeuronArtifact:
    """The artifact at `path` (ArtifactError, naming the file as `name` or its path, if it is not one)."""
    path = Path(path)
    where = name or str(path)
    try:
        data = read_json(path)
    except OSError as exc:
        raise ArtifactError(f"{where} cannot be read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ArtifactError(f"{where} is not valid JSON: {exc}") from exc
    return NeuronArtifact.from_json(data, where)
