"""Post-hoc probes over checkpoints (`phaselens probe`)."""

from phaselens.posthoc.runner import DEFAULT_PROBES, SweepResult, run_probes

__all__ = ["DEFAULT_PROBES", "SweepResult", "run_probes"]
