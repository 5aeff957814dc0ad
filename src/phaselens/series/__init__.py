"""Public checkpoint series (e.g. Pythia's `step{N}` revisions) as phaselens runs."""

from phaselens.series.hf import import_hf, pythia_schedule, revision_step

__all__ = ["import_hf", "pythia_schedule", "revision_step"]
