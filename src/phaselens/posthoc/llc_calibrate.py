"""`phaselens llc-calibrate RUN`: SGLD step size ε and localization γ chosen on one checkpoint.

A small grid (ε × γ) of `llc` estimates at one checkpoint, each with its chains' loss traces
and diagnostics, and a recommendation by a stated rule (the plateau rule):

    among the settings whose chains all stayed healthy (none diverged, λ̂ > 0, the trace settled
    after burn-in), take the γ at which λ̂ depends least on ε (the smallest spread, max − min over
    the median, of its healthy ε, at least two of them), and at that γ the ε whose λ̂ is nearest
    the median of the row: the middle of the plateau (the larger ε on a tie: faster mixing).

A small γ lets chains wander out of the basin (λ̂ grows with ε), a large one pins them too
tightly to mix at small ε: both show as λ̂ moving with ε, which the diagnostics alone do not see.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from phaselens.errors import PhaselensError

EPSILONS = (1e-4, 3e-4, 1e-3, 3e-3)
GAMMAS = (10.0, 100.0, 1000.0)


@dataclass
class CalibrationPoint:
    epsilon: float
    gamma: float
    llc: float
    llc_std: float
    traces: list[list[float]]  # (C, burnin + draws)
    burnin: int
    init_loss: float
    warnings: list[str]

    @property
    def healthy(self) -> bool:
        return not self.warnings


@dataclass
class Calibration:
    run: Path
    step: int
    points: list[CalibrationPoint]
    recommended: CalibrationPoint | None

    def text(self) -> str:
        lines = [f"llc calibration of {self.run} at step {self.step} (ε × γ grid; λ̂ ± std over chains):"]
        for p in self.points:
            verdict = "ok" if p.healthy else "; ".join(w.split(":")[0] for w in p.warnings)
            lines.append(f"  ε={p.epsilon:<8g} γ={p.gamma:<8g} λ̂ = {p.llc:9.2f} ± {p.llc_std:7.2f}   {verdict}")
        if self.recommended is None:
            lines.append("no γ kept two settings of ε healthy, so no plateau to choose from: try smaller epsilon, "
                         "more burnin or larger gamma "
                         "(phaselens llc-calibrate RUN --epsilons ... --gammas ...)")
        else:
            r = self.recommended
            lines.append(f"recommended: epsilon={r.epsilon:g} gamma={r.gamma:g} (the γ where λ̂ depends least on ε, "
                         "and the ε in the middle of that plateau): "
                         f"phaselens probe {self.run} --probes llc --probe-option llc.epsilon={r.epsilon:g} "
                         f"--probe-option llc.gamma={r.gamma:g}")
        return "\n".join(lines)


def plateau_spread(row: Sequence[CalibrationPoint]) -> float:
    """How much λ̂ moves with ε at one γ: (max − min) / |median| over the row's healthy points."""
    values = sorted(p.llc for p in row)
    middle = float(np.median(values))
    return (values[-1] - values[0]) / abs(middle) if middle else math.inf


def recommend(points: Sequence[CalibrationPoint]) -> CalibrationPoint | None:
    """The plateau rule (see the module): None when no γ has two healthy ε."""
    rows: dict[float, list[CalibrationPoint]] = {}
    for p in points:
        if p.healthy:
            rows.setdefault(p.gamma, []).append(p)
    rows = {gamma: row for gamma, row in rows.items() if len(row) >= 2}
    if not rows:
        return None
    gamma = min(rows, key=lambda g: (plateau_spread(rows[g]), g))
    middle = float(np.median([p.llc for p in rows[gamma]]))
    return min(rows[gamma], key=lambda p: (round(abs(p.llc - middle), 9), -p.epsilon))


def calibrate_llc(run: str | Path, step: int | None = None, epsilons: Sequence[float] = EPSILONS,
                  gammas: Sequence[float] = GAMMAS, options: dict | None = None, progress: bool = True,
                  device: str | None = None) -> Calibration:
    """Estimate the LLC at checkpoint `step` (default: the last) for every (ε, γ) in the grid, other options as given.

    All settings' chains advance together (`LLCEstimator.estimate_grid`), on one torch thread on a CPU;
    `device` (auto|cpu|cuda|cuda:N|mps, the one device rule) says where (default: auto).
    """
    import torch

    import phaselens.probes  # noqa: F401
    from phaselens.models.device import resolve_device
    from phaselens.probes.llc import one_cpu_thread
    from phaselens.progress import progress_bar
    from phaselens.run import open_run
    from phaselens.run_files import ensure_run_files

    opened = open_run(run)
    steps = opened.checkpoint_steps()
    if not steps:
        raise PhaselensError(f"{opened.path} has no checkpoints to calibrate on")
    step = steps[-1] if step is None else step
    options = {k: v for k, v in (options or {}).items() if k not in ("epsilon", "gamma")}
    plan = opened.plan(["llc"], {"llc": options}).require("llc-calibrate")  # the run's llc options, then these
    ensure_run_files(opened, plan)
    probe = plan.probes[0].make()
    probe.bind_run(opened.path)
    where = resolve_device(device)
    model = opened.load_model(step, device=str(where))
    grid = [(float(e), float(g)) for e in epsilons for g in gammas]
    steps_per_chain = probe.settings.burnin + probe.settings.draws
    unit = f"SGLD steps, {len(grid)}×{probe.settings.chains} chains"
    with progress_bar(f"llc-calibrate step {step}", steps_per_chain, unit=unit, enabled=progress) as update, \
            torch.inference_mode(False), one_cpu_thread() if where.type == "cpu" else contextlib.nullcontext():
        results = probe.estimator(model).estimate_grid(grid, progress=lambda done: update(completed=done))
    points = [CalibrationPoint(r.options.epsilon, r.options.gamma, r.llc, r.llc_std, r.traces.tolist(), r.options.burnin,
                               r.init_loss, r.warnings) for r in results]
    return Calibration(opened.path, step, points, recommend(points))
