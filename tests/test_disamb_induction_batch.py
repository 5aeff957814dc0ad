"""Late-disambiguation runs store an induction batch of their characters: head scores read it, while
attention_to and patching keep reading the task's own batch (its z and first-target positions)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from phaselens.posthoc.runner import run_probes
from phaselens.probes.base import make_probe
from phaselens.probes.measure import measure_model
from phaselens.run import open_run
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.disambiguation_config import ALPHABET
from phaselens.training.config import load_config
from phaselens.training.trainer import train

TINY_DISAMB = ["data.k=4", "data.n_unique_b=20", "train.steps=20", "train.checkpoint_every=10", "data.probe_size=16",
               "data.eval_size=16", "telemetry.checkpoint_probes=[heads,attention_to,patching]"]


@pytest.fixture(scope="module")
def disamb_run(tmp_path_factory) -> Path:
    """disamb_small (bz_to_a, K = 4) trained 20 steps; heads, attention_to and patching measured at checkpoints 0, 10, 20. Read-only."""
    path = tmp_path_factory.mktemp("disamb") / "run"
    train(load_config("disamb_small", TINY_DISAMB), path, progress=False)
    return path


def _stored(run, probe: str, metric: str, step: int) -> torch.Tensor:
    rows = run.metrics(probe=probe, metric=metric, source="checkpoint")
    return torch.tensor(rows[rows["step"] == step].sort_values(["layer", "head"])["value"].to_numpy())


def _direct(model, batch: TaskBatch, probe: str, metric: str, **options) -> torch.Tensor:
    (_, measurements), = measure_model(model, batch, [make_probe(probe, **options)])
    return next(m.value for m in measurements if m.metric == metric).flatten().double()


def test_a_disambiguation_run_stores_an_induction_batch_of_its_characters(disamb_run):
    probe = TaskBatch.load(disamb_run / "probe_batch.safetensors")
    induction = TaskBatch.load(disamb_run / "induction_batch.safetensors")
    assert induction.tokens.shape == probe.tokens.shape == (16, 16)
    assert int(induction.tokens.min()) >= 0 and int(induction.tokens.max()) < len(ALPHABET)  # no PAD, BOS, EOS or SEP
    copy, source = induction.positions["copy"], induction.positions["source"]
    assert bool(copy.any(-1).all()) and bool(source.any(-1).all())  # every sequence repeats a segment
    offsets = {int(copy[r].nonzero()[0]) - int(source[r].nonzero()[0]) for r in range(len(induction))}
    assert len(offsets) > 1  # a variable offset, even in a 16-token context


def test_checkpoint_head_scores_read_the_induction_batch_and_z_probes_the_task_batch(disamb_run):
    run = open_run(disamb_run)
    model = run.load_model(20)
    batches = run.probe_batches()
    study = run.run_config().study
    for metric in ("induction", "prev_token", "duplicate"):
        stored = _stored(run, "heads", metric, 20)
        assert torch.allclose(stored, _direct(model, batches["induction"], "heads", metric), atol=1e-5), metric
    assert not torch.allclose(_stored(run, "heads", "induction", 20), _direct(model, batches["probe"], "heads", "induction"), atol=1e-3)
    mass = _direct(model, batches["probe"], "attention_to", "mass", **study.probe_options["attention_to"])
    assert torch.allclose(_stored(run, "attention_to", "mass", 20), mass, atol=1e-5)
    effect = _direct(model, batches["probe"], "patching", "effect", **study.probe_options["patching"])
    assert torch.allclose(_stored(run, "patching", "effect", 20), effect, atol=1e-5)


def test_an_old_disambiguation_run_gets_its_induction_batch_from_phaselens_probe(disamb_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(disamb_run, run)
    original = (run / "induction_batch.safetensors").read_bytes()
    trained = {probe: open_run(run).metrics(probe=probe, source="checkpoint") for probe in ("heads", "attention_to", "patching")}
    (run / "induction_batch.safetensors").unlink()
    assert run_probes(run, probes=["attention_to"], remeasure=True, progress=False).ok
    assert not (run / "induction_batch.safetensors").exists()  # attention_to reads the task's batch here
    assert run_probes(run, probes=["heads"], remeasure=True, progress=False).ok
    assert (run / "induction_batch.safetensors").read_bytes() == original  # the batch training would have written
    assert run_probes(run, probes=["attention_to", "patching"], remeasure=True, progress=False).ok  # beside an induction batch
    for probe, rows in trained.items():  # post-hoc, each probe reads the batch it read at checkpoints
        again = open_run(run).metrics(probe=probe, source="checkpoint")
        key = ["step", "metric", "layer", "head"]
        merged = rows.merge(again, on=key, suffixes=("_trained", "_post_hoc"))
        assert len(merged) == len(rows) > 0
        assert torch.allclose(torch.tensor(merged["value_trained"].to_numpy()), torch.tensor(merged["value_post_hoc"].to_numpy()),
                              atol=1e-5), probe
