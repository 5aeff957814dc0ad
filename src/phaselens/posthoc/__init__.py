"""Post-hoc probes over checkpoints (`phaselens probe`)."""

from phaselens.posthoc.runner import SweepResult, run_probes

__all__ = ["SweepResult", "run_probes"]
