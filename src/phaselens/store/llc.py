"""The `llc` probe's artifact: one JSON per checkpoint, `artifacts/llc/step_XXXXXXXX.json` (torch-free reader).

Schema (written by `phaselens.probes.llc.LLCResult.artifact`):
    llc, llc_std: float            λ̂ and its standard deviation over chains (ddof 0)
    llc_se: float                  its standard error over chains (std with ddof 1 over √C); absent in older files
    component, kind, layer, head, size: which weights were sampled ("model", or a component of
                                   `ModelAdapter.component_parameters()`) and how many (d′)
    components: list[dict]         with the `components` option: one entry per component, each with the
                                   fields above (traces included); absent otherwise
    positions: str                 with the `positions` option: the position set the loss was restricted to
    chain_llc: list[float] (C,)    each chain's estimate
    init_loss: float               L_n(w*), the loss on the whole n-sample at the checkpoint
    n_beta: float                  the inverse temperature nβ
    options: dict                  the SGLD options (epsilon, gamma, n_beta, chains, draws, burnin, batch_size, n, seed)
    batched: bool, seconds: float  how the chains ran, and how long it took
    warnings: list[str]            diagnostics: divergence, left the basin, λ̂ < 0, not settled after burn-in
    traces: list[list[float|None]] (C, burnin + draws) minibatch loss before each step (None: NaN/inf)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from phaselens.store.run_dir import RunDir


@dataclass(frozen=True)
class LLCArtifact:
    step: int
    llc: float
    llc_std: float
    chain_llc: list[float]
    init_loss: float
    n_beta: float
    options: dict
    batched: bool
    seconds: float
    warnings: list[str]
    traces: list[list[float | None]]
    llc_se: float = float("nan")
    component: str = "model"
    kind: str = "model"
    layer: int | None = None
    head: int | None = None
    size: int = 0
    positions: str | None = None
    components: list["LLCArtifact"] = field(default_factory=list)

    @property
    def all_warnings(self) -> list[str]:
        """The whole model's warnings and each component's, the component named."""
        return self.warnings + [f"{c.component}: {w}" for c in self.components for w in c.warnings]

    @property
    def burnin(self) -> int:
        return int(self.options.get("burnin", 0))

    @classmethod
    def read(cls, path: Path) -> "LLCArtifact":
        data = json.loads(path.read_text())
        return cls.of(int(path.stem.split("_")[-1]), data)

    @classmethod
    def of(cls, step: int, data: dict) -> "LLCArtifact":
        """One artifact (or one component's entry) from its JSON; fields newer than the file take their defaults."""
        fields_ = {k: data[k] for k in cls.__dataclass_fields__ if k not in ("step", "components") and k in data}
        if fields_.get("llc_se") is None:
            fields_["llc_se"] = float("nan")
        parts = [cls.of(step, c) for c in data.get("components") or []]
        return cls(step=step, components=parts, **fields_)


def llc_artifact_paths(run: Path | str) -> dict[int, Path]:
    """Step -> artifact file of every checkpoint the `llc` probe measured."""
    folder = RunDir(run).artifacts / "llc"
    if not folder.is_dir():
        return {}
    return {int(p.stem.split("_")[-1]): p for p in sorted(folder.glob("step_*.json"))}


def read_llc_artifacts(run: Path | str) -> list[LLCArtifact]:
    """Every `llc` artifact of a run, by step."""
    return [LLCArtifact.read(path) for _, path in sorted(llc_artifact_paths(run).items())]
