"""Live circuits while training: measured every N steps on a copy of the weights, off the training step, so the
run trains bit-identically to one without them, and each live row equals a post-hoc measurement of the same step."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import phaselens as pl
from phaselens.probes.measure import measure_model
from phaselens.probes.plan import PlanContext, plan_probes
from phaselens.training.config import load_config
from phaselens.training.trainer import train

# induction_run's settings (tests/conftest.py), with the circuits probe live every 5 steps on 4 sequences
SETTINGS = ["train.steps=20", "train.checkpoint_every=10", "telemetry.every=5"]
OPTIONS = {"every": 5, "rows": 4, "method": "exact"}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    config = load_config("induction", SETTINGS)
    config.telemetry.probes = [*config.telemetry.probes, "circuits"]
    config.telemetry.probe_options = {"circuits": OPTIONS}
    path = tmp_path_factory.mktemp("live_circuits") / "run"
    train(config, path, progress=False)
    return path


def test_the_plan_measures_circuits_live_on_the_batch_it_reads_at_checkpoints():
    config = load_config("induction", SETTINGS)
    live = plan_probes(PlanContext.of(config), "live", ["circuits"]).require()
    checkpoint = plan_probes(PlanContext.of(config), "checkpoint", ["circuits"]).require()
    assert live.routes["circuits"] == checkpoint.routes["circuits"] != "training"


def test_a_run_with_live_circuits_trains_bit_identically_to_one_without(live_run, induction_run):
    with_circuits, without = pl.open_run(live_run), pl.open_run(induction_run)
    assert with_circuits.checkpoint_steps() == without.checkpoint_steps() == [0, 10, 20]
    for step in (10, 20):
        a, b = with_circuits.load_model(step).state_dict(), without.load_model(step).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    losses = [run.metrics(probe="loss", source="live").sort_values(["step", "metric"]).reset_index(drop=True)
              for run in (with_circuits, without)]
    pd.testing.assert_frame_equal(losses[0][["step", "metric", "value"]], losses[1][["step", "metric", "value"]])


def test_live_circuits_rows_come_every_5_steps_and_equal_a_post_hoc_measurement_of_that_step(live_run):
    run = pl.open_run(live_run)
    live = run.metrics(probe="circuits", source="live")
    assert sorted(live["step"].unique()) == [0, 5, 10, 15]
    assert {"metric_clean", "metric_corrupt", "circuit_size", "faithfulness", "node_score", "edge:L0H1->L1H0.k"} <= set(live["metric"])
    planned = run.plan(["circuits"], writable=False).probes[0]
    assert {k: planned.options[k] for k in OPTIONS} == OPTIONS
    batch = run.probe_batches()[planned.batch]
    for step in (10,):
        (_, measured), = measure_model(run.load_model(step), batch, [planned.make()])
        expected = {}
        for m in measured:
            value = m.value.flatten().tolist()
            keys = [(m.metric, None, None)] if m.value.dim() == 0 else [
                (m.metric, layer, head) for layer in range(m.value.shape[0]) for head in range(m.value.shape[1])]
            expected.update(zip(keys, value))
        rows = live[live["step"] == step]
        assert len(rows) == len(expected)
        for r in rows.itertuples():
            key = (r.metric, None if pd.isna(r.layer) else int(r.layer), None if pd.isna(r.head) else int(r.head))
            want = expected[key]
            assert (math.isnan(want) and math.isnan(r.value)) or r.value == pytest.approx(want, abs=1e-6), key

