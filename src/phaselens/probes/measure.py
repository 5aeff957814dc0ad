"""The function API: probe values from an `ActivationCache` (or any dict of activations)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from phaselens.probes.base import Probe, ProbeInputs, make_probe, to_rows
from phaselens.models.adapter import ModelAdapter, adapter_for
from phaselens.probes.live import run_probes
from phaselens.tasks.batch import TaskBatch

if TYPE_CHECKING:
    import pandas as pd


def measure_cache(
    cache: Mapping[str, torch.Tensor],
    batch: TaskBatch | torch.Tensor,
    probes: Sequence[str | Probe] = ("attention", "heads"),
    model: torch.nn.Module | None = None,
    logits: torch.Tensor | None = None,
    step: int = 0,
    source: str = "cache",
) -> pd.DataFrame:
    """Probe values from cached activations as a DataFrame (step, probe, metric, layer, head, value, source).

    Args:
        cache: an `ActivationCache` from `model.run_with_cache(tokens)`, or a dict hook name -> tensor.
        batch: the tokens the cache was computed on (or a `TaskBatch` with task masks).
        probes: probe names or instances; each must find its hook points in `cache`.
        model: the model the cache came from (its adapter gives the hook names and dimensions).
        logits: the model output, for probes that read logits (`loss`).
    """
    import pandas as pd

    from phaselens.store.metrics import COLUMNS

    if model is None:
        raise ValueError("measure_cache needs model= (the model the cache came from): probes read their hook "
                         "names and dimensions from it")
    made = [make_probe(p) for p in probes]
    adapter = adapter_for(model)
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    for probe in made:
        missing = [n for n in probe.hook_names(adapter) if n not in cache]
        if missing:
            raise KeyError(f"probe {probe.name!r} needs {missing} in the cache; run_with_cache with those names")
        if probe.needs_logits and logits is None:
            raise ValueError(f"probe {probe.name!r} reads logits: pass logits=model output")
    inputs = ProbeInputs(acts=cache, batch=TaskBatch.coerce(batch), model=adapter.model, logits=logits,
                         n_layers=n_layers, n_heads=n_heads, _adapter=adapter)
    rows = to_rows(step, source, run_probes(made, inputs))
    return pd.DataFrame(rows, columns=COLUMNS).astype({"layer": "Int64", "head": "Int64"})


def measure_batches(
    model: torch.nn.Module | ModelAdapter, batches: Mapping[str, TaskBatch], probes: Sequence[Probe],
    routes: Mapping[str, str], artifacts: dict | None = None,
) -> list[tuple[str, list]]:
    """Each probe measured on the batch `routes[probe.name]` names (a measurement plan's `routes`).

    One `measure_model` forward per batch in use; results in the order of `probes`.
    """
    groups: dict[str, list[Probe]] = {}
    for probe in probes:
        groups.setdefault(routes[probe.name], []).append(probe)
    results: dict[str, list] = {}
    for name, group in groups.items():
        results.update(measure_model(model, batches[name], group, artifacts=artifacts))
    return [(probe.name, results[probe.name]) for probe in probes]


def measure_model(
    model: torch.nn.Module | ModelAdapter, batch: TaskBatch, probes: Sequence[Probe], artifacts: dict | None = None
) -> list[tuple[str, list]]:
    """Run `probes` on one no-grad forward of `batch`, caching only the hook points they read.

    When none of them needs or uses the logits, the forward stops after the last of those hook points.

    This is how a checkpoint is measured, during training and post-hoc alike, so both give
    the same numbers for the same weights and batch. Pass a dict as `artifacts` to collect
    each probe's optional JSON artifact too. Probes reduce in float32 whatever the model's
    dtype: activations held in bfloat16 or float16 are widened before any probe reads them.
    """
    adapter = adapter_for(model)
    names = sorted({n for p in probes for n in p.hook_names(adapter)})
    was_training = adapter.model.training
    if was_training:  # eval() walks every module: only when it changes something
        adapter.model.eval()
    try:
        with torch.no_grad():
            if any(p.needs_logits or p.uses_logits for p in probes):
                logits, cache = adapter.run_with_cache(batch.tokens, names)
            else:  # no logits wanted: the forward ends at the last hook point read
                logits, cache = None, adapter.activations(batch.tokens, names)
    finally:
        if was_training:
            adapter.model.train()
    half = (torch.bfloat16, torch.float16)
    cache = {name: act.float() if act.dtype in half else act for name, act in cache.items()}
    logits = logits.float() if logits is not None and logits.dtype in half else logits
    inputs = ProbeInputs(acts=cache, batch=batch, model=adapter.model, logits=logits, n_layers=adapter.n_layers,
                         n_heads=adapter.n_heads, _adapter=adapter)
    results = run_probes(probes, inputs)
    if artifacts is not None:
        with torch.no_grad():
            for probe in probes:
                value = probe.artifact(inputs)
                if value is not None:
                    artifacts[probe.name] = value
    return results
