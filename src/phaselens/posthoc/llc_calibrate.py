"""`phaselens llc-calibrate RUN`: SGLD step size ε and localization γ chosen on one checkpoint.

A small grid (ε × γ) of `llc` estimates at one checkpoint, each with its chains' loss traces
and diagnostics, and a recommendation by a stated rule:

    among the settings whose chains all stayed healthy (none diverged, λ̂ > 0, the trace settled
    after burn-in), take the largest ε (fastest mixing), then the smallest γ at that ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from phaselens.errors import PhaselensError
from phaselens.store.run_dir import RunDir

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
            lines.append("no setting was healthy: try smaller epsilon, more burnin or larger gamma "
                         "(phaselens llc-calibrate RUN --epsilons ... --gammas ...)")
        else:
            r = self.recommended
            lines.append(f"recommended: epsilon={r.epsilon:g} gamma={r.gamma:g} (the largest healthy ε, then the smallest γ): "
                         f"phaselens probe {self.run} --probes llc --probe-option llc.epsilon={r.epsilon:g} "
                         f"--probe-option llc.gamma={r.gamma:g}")
        return "\n".join(lines)


def recommend(points: Sequence[CalibrationPoint]) -> CalibrationPoint | None:
    """The largest healthy ε, and at that ε the smallest healthy γ (None when no point is healthy)."""
    healthy = [p for p in points if p.healthy]
    if not healthy:
        return None
    return min(healthy, key=lambda p: (-p.epsilon, p.gamma))


def calibrate_llc(run: str | Path, step: int | None = None, epsilons: Sequence[float] = EPSILONS,
                  gammas: Sequence[float] = GAMMAS, options: dict | None = None, progress: bool = True) -> Calibration:
    """Estimate the LLC at checkpoint `step` (default: the last) for every (ε, γ) in the grid, other options as given.

    All settings' chains advance together (`LLCEstimator.estimate_grid`) on one torch thread.
    """
    import torch

    import phaselens.probes  # noqa: F401
    from phaselens.posthoc.runner import ensure_training_sample
    from phaselens.probes.base import make_probe
    from phaselens.probes.llc import one_cpu_thread
    from phaselens.progress import progress_bar
    from phaselens.run import open_run

    opened = open_run(run)
    steps = opened.checkpoint_steps()
    if not steps:
        raise PhaselensError(f"{opened.path} has no checkpoints to calibrate on")
    step = steps[-1] if step is None else step
    options = {k: v for k, v in (options or {}).items() if k not in ("epsilon", "gamma")}
    ensure_training_sample(RunDir(opened.path), options)
    probe = make_probe("llc", **options)
    probe.bind_run(opened.path)
    model = opened.load_model(step)
    grid = [(float(e), float(g)) for e in epsilons for g in gammas]
    steps_per_chain = probe.settings.burnin + probe.settings.draws
    unit = f"SGLD steps, {len(grid)}×{probe.settings.chains} chains"
    with progress_bar(f"llc-calibrate step {step}", steps_per_chain, unit=unit, enabled=progress) as update, \
            torch.inference_mode(False), one_cpu_thread():
        results = probe.estimator(model).estimate_grid(grid, progress=lambda done: update(completed=done))
    points = [CalibrationPoint(r.options.epsilon, r.options.gamma, r.llc, r.llc_std, r.traces.tolist(), r.options.burnin,
                               r.init_loss, r.warnings) for r in results]
    return Calibration(opened.path, step, points, recommend(points))
