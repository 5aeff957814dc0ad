"""phaselens: mechanistic interpretability across training time.

    import phaselens as pl
    run = pl.open_run("runs/demo")
    run.metrics(probe="attention", metric="entropy")

Heavy modules (torch, TransformerLens) load on first use of the names that need them, so
`import phaselens` and the command line start fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers see of the lazy names below (the same list: tests/test_export_docs.py)
    from phaselens.errors import CheckpointError, ConfigError, PhaselensError, RunError, TrainingDiverged
    from phaselens.models import build_model
    from phaselens.models.adapter import adapter_for
    from phaselens.models.config import ModelConfig
    from phaselens.probes.attention import (attention_coherence, attention_entropy, attention_head_variance,
                                            attention_specialization)
    from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
    from phaselens.probes.geometry import GeometryProbe, interaction_energy, kl_to_unigram
    from phaselens.probes.heads import detection_patterns, head_score
    from phaselens.probes.live import Telemetry
    from phaselens.probes.loss import LossProbe
    from phaselens.probes.measure import measure_cache
    from phaselens.report import write_report
    from phaselens.run import Run, open_run
    from phaselens.series.hf import import_hf
    from phaselens.server import serve
    from phaselens.signals.transitions import detect_transitions
    from phaselens.tasks.batch import TaskBatch
    from phaselens.tasks.induction import InductionTask
    from phaselens.training.config import RunConfig, load_config
    from phaselens.training.trainer import train
    from phaselens.training.trainer_callback import TelemetryCallback

_LAZY = {
    "open_run": "phaselens.run",
    "Run": "phaselens.run",
    "Telemetry": "phaselens.probes.live",
    "TelemetryCallback": "phaselens.training.trainer_callback",
    "Probe": "phaselens.probes.base",
    "Measurement": "phaselens.probes.base",
    "Needs": "phaselens.probes.base",
    "ProbeInputs": "phaselens.probes.base",
    "register_probe": "phaselens.probes.base",
    "measure_cache": "phaselens.probes.measure",
    "ModelConfig": "phaselens.models.config",
    "build_model": "phaselens.models",
    "adapter_for": "phaselens.models.adapter",
    "RunConfig": "phaselens.training.config",
    "load_config": "phaselens.training.config",
    "train": "phaselens.training.trainer",
    "detect_transitions": "phaselens.signals.transitions",
    "write_report": "phaselens.report",
    "serve": "phaselens.server",
    "TaskBatch": "phaselens.tasks.batch",
    "InductionTask": "phaselens.tasks.induction",
    "attention_entropy": "phaselens.probes.attention",
    "attention_coherence": "phaselens.probes.attention",
    "attention_specialization": "phaselens.probes.attention",
    "attention_head_variance": "phaselens.probes.attention",
    "head_score": "phaselens.probes.heads",
    "GeometryProbe": "phaselens.probes.geometry",
    "LossProbe": "phaselens.probes.loss",
    "interaction_energy": "phaselens.probes.geometry",
    "kl_to_unigram": "phaselens.probes.geometry",
    "import_hf": "phaselens.series.hf",
    "detection_patterns": "phaselens.probes.heads",
    "PhaselensError": "phaselens.errors",
    "ConfigError": "phaselens.errors",
    "CheckpointError": "phaselens.errors",
    "RunError": "phaselens.errors",
    "TrainingDiverged": "phaselens.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'phaselens' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
