"""Trained text runs store an induction batch, so heads, attention_to and patching run on them too."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from phaselens.cli import app
from phaselens.posthoc.runner import run_probes
from phaselens.probes.base import make_probe
from phaselens.probes.measure import measure_model
from phaselens.run import open_run
from phaselens.tasks.batch import TaskBatch
from phaselens.training.config import load_config
from phaselens.training.trainer import Trainer, train

TEXT = "\n".join(f"{speaker}:\nThe {n}th line of a short play, said {n % 7} times over.\n"
                 for n, speaker in zip(range(120), ["ANNA", "BORIS", "CLARA"] * 40))
TINY_GPT = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_mlp=64", "model.n_ctx=48", "data.corpus=",
            "data.probe_size=6", "data.eval_size=8", "train.batch_size=8", "train.steps=10", "train.checkpoint_every=5",
            "train.eval_every=5", "train.warmup=0", "train.threads=1", "telemetry.every=5", "telemetry.probes=[attention,heads,loss]",
            "telemetry.checkpoint_probes=[]"]


@pytest.fixture(scope="module")
def play(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("play") / "play.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, play) -> Path:
    """gpt_shakespeare shrunk to 2 layers, trained 10 steps on a short play, heads measured at checkpoints 0, 5, 10. Read-only."""
    path = tmp_path_factory.mktemp("gpt") / "run"
    train(load_config("gpt_shakespeare", [*TINY_GPT, f"data.path={play}"]), path, progress=False)
    return path


def test_a_text_run_stores_an_induction_batch_of_the_models_ordinary_ids(text_run):
    probe = TaskBatch.load(text_run / "probe_batch.safetensors")
    induction = TaskBatch.load(text_run / "induction_batch.safetensors")
    assert induction.tokens.shape == probe.tokens.shape == (6, 48)
    assert int(induction.tokens.min()) >= 0 and int(induction.tokens.max()) < 256
    copy, source = induction.positions["copy"], induction.positions["source"]
    assert bool(copy.any(-1).all()) and bool(source.any(-1).all())  # every sequence repeats a segment
    # the copies repeat the source: each copy prediction's target equals a token of the first occurrence
    rows, cols = copy.nonzero(as_tuple=True)
    targets = induction.tokens[rows, cols + 1]
    assert all(int(t) in induction.tokens[r][source[r]].tolist() for r, t in zip(rows.tolist(), targets.tolist()))
    offsets = {int(source[r].nonzero()[0]) for r in range(len(induction))}
    assert len(offsets) > 1  # a variable offset, not a fixed half-length repeat


def test_the_induction_batch_is_kept_on_resume_and_checkpoint_head_scores_read_it(text_run, play, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    batch_file = run / "induction_batch.safetensors"
    written = batch_file.stat().st_mtime_ns, batch_file.read_bytes()
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    Trainer(load_config("gpt_shakespeare", [*TINY_GPT, f"data.path={play}"]), run, resume=True, progress=False).train()
    assert (batch_file.stat().st_mtime_ns, batch_file.read_bytes()) == written  # not rebuilt

    opened = open_run(run)
    model = opened.load_model(10)
    induction = opened.probe_batches()["induction"]
    (_, direct), = measure_model(model, induction, [make_probe("heads")])
    stored = opened.metrics(probe="heads", metric="induction", source="checkpoint")
    stored = stored[stored["step"] == 10].sort_values(["layer", "head"])["value"].to_numpy()
    assert torch.allclose(torch.tensor(stored), direct[0].value.flatten().double(), atol=1e-5)
    (_, on_text), = measure_model(model, opened.probe_batch(), [make_probe("heads")])
    assert not torch.allclose(torch.tensor(stored), on_text[0].value.flatten().double(), atol=1e-3)


def test_heads_attention_to_and_patching_run_post_hoc_on_a_text_run(text_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    result = CliRunner().invoke(app, ["probe", str(run), "--probes", "heads,attention_to,patching"])
    assert result.exit_code == 0, result.output
    rows = open_run(run).metrics(source="checkpoint")
    for step in (0, 5, 10):
        at = rows[rows["step"] == step]
        assert len(at[(at["probe"] == "attention_to") & (at["metric"] == "mass")]) == 2 * 2  # per head
        assert len(at[(at["probe"] == "patching") & (at["metric"] == "effect")]) == 2 + 1  # per residual stream
        assert len(at[(at["probe"] == "patching") & (at["metric"] == "z_dependence")]) == 1
    mass = rows[(rows["probe"] == "attention_to") & (rows["step"] == 10)]["value"]
    assert bool(((mass > 0) & (mass < 1)).all())


def test_a_text_run_from_before_induction_batches_gets_one_when_a_probe_reads_it(text_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    original = (run / "induction_batch.safetensors").read_bytes()
    (run / "induction_batch.safetensors").unlink()
    assert run_probes(run, probes=["logit_lens"], progress=False).ok
    assert not (run / "induction_batch.safetensors").exists()  # no probe read it
    assert run_probes(run, probes=["attention_to"], progress=False).ok
    assert (run / "induction_batch.safetensors").read_bytes() == original  # the batch training would have written


def test_on_a_bdh_run_heads_attention_to_and_patching_are_refused_with_the_reason(play, tmp_path):
    tiny_bdh = ["model.n_layers=2", "model.d_model=16", "model.n_heads=2", "model.multiplier=4", "model.n_ctx=32", "data.corpus=",
                f"data.path={play}", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2", "train.eval_every=2",
                "train.threads=1", "data.probe_size=4", "data.eval_size=4", "telemetry.checkpoint_probes=[]"]
    run = tmp_path / "bdh"
    train(load_config("bdh_shakespeare_small", tiny_bdh), run, progress=False)
    assert (run / "induction_batch.safetensors").is_file()  # every text run stores one
    for probe in ("heads", "attention_to", "patching"):
        result = CliRunner().invoke(app, ["probe", str(run), "--probes", probe])
        assert result.exit_code != 0
        assert f"probe {probe!r}" in result.output and "model.kind=bdh does not have" in result.output, result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["probe", str(run)])  # the default set leaves them out
    assert result.exit_code == 0, result.output
    assert set(open_run(run).metrics(source="checkpoint")["probe"]) == {"loss"}


def test_geometry_on_a_bdh_run_measures_every_checkpoint_on_bdhs_own_residual_streams(play, tmp_path):
    tiny_bdh = ["model.n_layers=2", "model.d_model=16", "model.n_heads=2", "model.multiplier=4", "model.n_ctx=32", "data.corpus=",
                f"data.path={play}", "train.steps=4", "train.batch_size=4", "train.checkpoint_every=2", "train.eval_every=2",
                "train.threads=1", "data.probe_size=4", "data.eval_size=4", "telemetry.checkpoint_probes=[]"]
    run = tmp_path / "bdh"
    train(load_config("bdh_shakespeare_small", tiny_bdh), run, progress=False)
    result = CliRunner().invoke(app, ["probe", str(run), "--probes", "geometry"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rows = open_run(run).metrics(probe="geometry", source="checkpoint")
    assert sorted(rows["step"].unique()) == [0, 2, 4]
    energy = rows[rows["metric"] == "interaction_energy"]
    # streams 0 (the embeddings, BDH's hook_embed) to 2 (after pass 1); BDH has no final norm, so no stream 3
    assert sorted(energy["layer"].unique()) == [0, 1, 2]
    assert energy["value"].between(np.exp(-1), np.e).all()
    kl = rows[rows["metric"] == "kl_unigram"]
    assert len(kl) == 3 and (kl["value"] >= 0).all()


def test_a_context_too_short_for_a_repeated_segment_trains_without_an_induction_batch(play, tmp_path):
    tiny = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.d_mlp=16", "model.n_ctx=3", "data.corpus=",
            f"data.path={play}", "train.steps=2", "train.checkpoint_every=2", "train.batch_size=2", "data.probe_size=2",
            "data.eval_size=2", "train.threads=1", "telemetry.probes=[attention,heads,loss]", "telemetry.checkpoint_probes=[]"]
    run = tmp_path / "run"
    train(load_config("gpt_shakespeare", tiny), run, progress=False)  # a trigram model: no segment and repeat fit
    assert not (run / "induction_batch.safetensors").exists()
    heads = open_run(run).metrics(probe="heads", source="checkpoint")
    assert sorted(heads["step"].unique()) == [0, 2]  # measured on the text batch instead
