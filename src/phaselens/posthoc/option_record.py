"""Which options a run's stored checkpoint values were measured with, kept in step with what a sweep asks for.

run.json's `posthoc_probe_options` records, per probe, the options its stored checkpoint values were
measured with (the plan's merged options, `probes.plan.merge_options`). A sweep that asks a probe for
other options would otherwise skip every stored (step, probe) pair and measure nothing new, so it is
refused unless `remeasure`; with `remeasure`, the probe's stored values (at `steps`, or at every
checkpoint) are dropped and measured again. Options that changed must be measured on every
checkpoint, so one curve never mixes settings.
"""

from __future__ import annotations

import json
from typing import Sequence

from phaselens.errors import ConfigError
from phaselens.probes.plan import canonical_options
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir

OPTIONS_KEY = "posthoc_probe_options"  # run.json: probe -> the options its stored checkpoint values were measured with
SOURCE = "checkpoint"


def reconcile_options(run_dir: RunDir, store: MetricsStore, chosen: dict[str, dict], steps: Sequence[int] | None,
                      remeasure: bool) -> None:
    """Refuse options that differ from the stored values' (unless `remeasure`, which drops those values), then record them."""
    recorded = dict(run_dir.read().get(OPTIONS_KEY) or {})
    chosen = {p: canonical_options(o) for p, o in chosen.items()}
    stored = {probe for _, probe in store.stored_pairs(SOURCE)}
    changed = {p: recorded[p] for p in chosen if p in stored and p in recorded and canonical_options(recorded[p]) != chosen[p]}
    if changed and not remeasure:
        lines = "; ".join(f"{p}: stored with {_options_text(recorded[p])}, asked for {_options_text(chosen[p])}"
                          for p in changed)
        raise ConfigError(f"the stored values were measured with other probe options ({lines}): pass --remeasure to "
                          "replace them, or measure on a copy of the run")
    if changed and steps:
        raise ConfigError(f"probe options changed for {', '.join(changed)}: remeasure every checkpoint (drop --steps), "
                          "so one curve does not mix settings")
    if remeasure:
        for probe in chosen:
            store.delete_probe(probe, SOURCE, steps or None)
            if not steps:  # only the artifacts a sweep writes (`runner._write_artifacts`); anything else there is kept
                for artifact in (run_dir.artifacts / probe).glob("step_*.json"):
                    artifact.unlink()
    if {**recorded, **chosen} != recorded:  # run.json is rewritten only when the record changes
        run_dir.update(**{OPTIONS_KEY: {**recorded, **chosen}})


def _options_text(options: dict) -> str:
    return json.dumps(options, sort_keys=True) if options else "the defaults"
