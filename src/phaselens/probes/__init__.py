"""Probes: metric formulas, the probe classes built on them, and live telemetry."""

from phaselens.probes.attention import (
    AttentionProbe,
    attention_coherence,
    attention_entropy,
    attention_head_variance,
    attention_specialization,
)
from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, make_probe, probe_names, register_probe
from phaselens.probes.heads import HeadsProbe, detection_patterns, head_score
from phaselens.probes.loss import LossProbe, token_losses
from phaselens.probes.logit_lens import LogitLensProbe, logit_lens_stats
from phaselens.probes.attention_to import AttentionToProbe, attention_mass
from phaselens.probes.patching import PatchingProbe, patching_effects
from phaselens.probes.geometry import GeometryProbe, interaction_energy, kl_to_unigram
from phaselens.probes.random_z import RandomZProbe, selector_swap_effect
from phaselens.probes.neurons import NeuronStats, NeuronsProbe
from phaselens.probes.llc import LLCEstimator, LLCProbe, SGLDOptions
from phaselens.probes.measure import measure_cache

__all__ = [
    "AttentionToProbe",
    "GeometryProbe",
    "interaction_energy",
    "kl_to_unigram",
    "LogitLensProbe",
    "PatchingProbe",
    "RandomZProbe",
    "selector_swap_effect",
    "attention_mass",
    "logit_lens_stats",
    "patching_effects",
    "AttentionProbe",
    "HeadsProbe",
    "LossProbe",
    "LLCEstimator",
    "LLCProbe",
    "SGLDOptions",
    "NeuronStats",
    "NeuronsProbe",
    "Measurement",
    "Needs",
    "Probe",
    "ProbeInputs",
    "attention_coherence",
    "attention_entropy",
    "attention_head_variance",
    "attention_specialization",
    "detection_patterns",
    "head_score",
    "make_probe",
    "measure_cache",
    "probe_names",
    "register_probe",
    "token_losses",
]
