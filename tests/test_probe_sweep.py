"""`phaselens probe`: post-hoc probes over checkpoints, resumable, with local and Ray backends."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import phaselens as pl
from phaselens.cli import app
from phaselens.posthoc.runner import run_probes
from phaselens.store.metrics import MetricsStore
from phaselens.training.config import load_config
from phaselens.training.trainer import train

PROBES = ["attention", "heads", "loss", "logit_lens", "attention_to", "patching"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short induction run whose checkpoints carry the trainer's own probe-batch values."""
    path = tmp_path_factory.mktemp("sweep") / "run"
    train(load_config("induction", ["train.steps=80", "train.checkpoint_every=20", "train.eval_every=40"]), path, progress=False)
    return path


@pytest.fixture
def run_copy(trained, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(trained, path)
    return path


def checkpoint_rows(path, probes=None) -> pd.DataFrame:
    frame = pl.open_run(path).metrics(source="checkpoint")
    if probes:
        frame = frame[frame["probe"].isin(probes)]
    return frame.sort_values(["probe", "metric", "step", "layer", "head"]).reset_index(drop=True)


def drop_checkpoint_rows(path) -> None:
    store = MetricsStore(path / "metrics.sqlite")
    store.delete_from_step(0, source="checkpoint")
    store.close()


def test_post_hoc_values_equal_the_values_logged_during_training(run_copy):
    logged = checkpoint_rows(run_copy, ["attention", "heads", "loss"])
    assert len(logged) and sorted(logged["step"].unique()) == [0, 20, 40, 60, 80]
    drop_checkpoint_rows(run_copy)
    result = run_probes(run_copy, ["attention", "heads", "loss"], progress=False)
    assert result.ok and result.measured == [0, 20, 40, 60, 80]
    again = checkpoint_rows(run_copy)
    pd.testing.assert_frame_equal(logged.drop(columns="value"), again.drop(columns="value"))
    assert (logged["value"] - again["value"]).abs().max() < 1e-5


def test_sweep_writes_each_checkpoints_attention_pattern_artifact(run_copy):
    import json

    drop_checkpoint_rows(run_copy)
    run_probes(run_copy, ["attention"], steps=[40], progress=False)
    artifact = json.loads((run_copy / "artifacts" / "attention" / "step_00000040.json").read_text())
    patterns = torch.tensor(artifact["patterns"]) / artifact["scale"]  # (L, H, T, T) probabilities
    assert patterns.shape == (2, 2, 64, 64) and len(artifact["tokens"]) == 64
    assert torch.allclose(patterns.sum(-1), torch.ones(2, 2, 64), atol=1e-2)  # rows of a softmax
    assert (patterns.triu(1) == 0).all()  # causal


def test_a_second_sweep_skips_what_is_stored(run_copy):
    first = run_probes(run_copy, PROBES, progress=False)
    assert first.ok and first.measured == [0, 20, 40, 60, 80]
    before = checkpoint_rows(run_copy)
    second = run_probes(run_copy, PROBES, progress=False)
    assert second.measured == [] and second.skipped == 5 * len(PROBES)
    pd.testing.assert_frame_equal(before, checkpoint_rows(run_copy))


def test_only_the_hooks_the_probes_need_are_cached(run_copy, monkeypatch):
    from phaselens.probes import measure

    seen = []
    original = measure.measure_model

    def spy(model, batch, probes, **kwargs):  # the forward keeps activations by a names filter, or by hooks when no logits are read
        cached, hooked = model.run_with_cache, model.run_with_hooks

        def run_with_cache(*args, names_filter=None, **kwargs):
            seen.append(sorted(names_filter))
            return cached(*args, names_filter=names_filter, **kwargs)

        def run_with_hooks(*args, fwd_hooks=(), **kwargs):
            seen.append(sorted(name for name, _ in fwd_hooks))
            return hooked(*args, fwd_hooks=fwd_hooks, **kwargs)

        monkeypatch.setattr(model, "run_with_cache", run_with_cache)
        monkeypatch.setattr(model, "run_with_hooks", run_with_hooks)
        return original(model, batch, probes, **kwargs)

    monkeypatch.setattr("phaselens.probes.measure.measure_model", spy)
    drop_checkpoint_rows(run_copy)
    run_probes(run_copy, ["attention"], steps=[20], progress=False)
    assert seen == [["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]]


def test_a_corrupt_checkpoint_is_recorded_as_failed_and_the_sweep_goes_on(run_copy):
    drop_checkpoint_rows(run_copy)
    weights = run_copy / "checkpoints" / "step_00000040" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = CliRunner().invoke(app, ["probe", str(run_copy), "--probes", "attention,heads"])
    assert result.exit_code == 1
    assert "step 40" in result.output and "model.safetensors" in result.output
    assert sorted(checkpoint_rows(run_copy)["step"].unique()) == [0, 20, 60, 80]
    failures = MetricsStore(run_copy / "metrics.sqlite").failures()
    assert set(failures["step"]) == {40} and "corrupt" in failures["reason"].iloc[0]


def test_local_workers_and_ray_produce_identical_tables(run_copy, tmp_path):
    pytest.importorskip("ray")
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    drop_checkpoint_rows(run_copy)
    drop_checkpoint_rows(other)
    local = run_probes(run_copy, PROBES, backend="local", workers=2, progress=False)
    remote = run_probes(other, PROBES, backend="ray", workers=2, progress=False)
    assert local.ok and remote.ok
    a, b = checkpoint_rows(run_copy), checkpoint_rows(other)
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-6)


def test_killing_a_sweep_and_running_it_again_completes_it(run_copy):
    drop_checkpoint_rows(run_copy)
    command = [sys.executable, "-m", "phaselens.cli", "probe", str(run_copy), "--probes", ",".join(PROBES)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some, not all, checkpoints are stored
        done = MetricsStore(run_copy / "metrics.sqlite").stored_pairs("checkpoint")
        if len({step for step, _ in done}) >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = MetricsStore(run_copy / "metrics.sqlite").stored_pairs("checkpoint")
    complete = {step for step in (0, 20, 40, 60, 80) if all((step, p) in stored for p in PROBES)}
    assert complete and stored == {(step, p) for step in complete for p in PROBES}  # a checkpoint lands whole
    for step in complete:  # with its artifacts
        assert (run_copy / "artifacts" / "attention" / f"step_{step:08d}.json").is_file()
    result = run_probes(run_copy, PROBES, progress=False)
    assert result.ok
    assert result.measured == sorted({0, 20, 40, 60, 80} - complete)  # nothing stored is measured again
    rows = checkpoint_rows(run_copy)
    assert not rows.duplicated(["probe", "metric", "step", "layer", "head"]).any()
    assert set(rows["step"]) == {0, 20, 40, 60, 80}


def test_a_failed_artifact_write_stops_the_sweep_and_its_checkpoint_is_measured_again(run_copy, monkeypatch):
    from phaselens.posthoc import runner

    drop_checkpoint_rows(run_copy)
    write = runner._write_artifacts

    def disk_full_at_40(run_dir, result):
        if result.step == 40:
            raise OSError("disk full")
        write(run_dir, result)

    monkeypatch.setattr(runner, "_write_artifacts", disk_full_at_40)
    with pytest.raises(RuntimeError, match="writing probe artifacts failed: OSError: disk full"):
        run_probes(run_copy, ["attention", "loss"], progress=False)
    stored = {step for step, _ in MetricsStore(run_copy / "metrics.sqlite").stored_pairs("checkpoint")}
    assert 40 not in stored and {0, 20} <= stored  # those written before the failure are kept
    for step in stored:
        assert (run_copy / "artifacts" / "attention" / f"step_{step:08d}.json").is_file()
    monkeypatch.setattr(runner, "_write_artifacts", write)
    again = run_probes(run_copy, ["attention", "loss"], progress=False)
    assert again.ok and 40 in again.measured and not set(again.measured) & stored


def test_ray_backend_without_ray_says_how_to_install(run_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    drop_checkpoint_rows(run_copy)
    result = CliRunner().invoke(app, ["probe", str(run_copy), "--backend", "ray"])
    assert result.exit_code == 2
    assert "pip install 'phaselens[ray]'" in result.output


def test_unknown_probe_and_missing_step_are_refused(run_copy):
    result = CliRunner().invoke(app, ["probe", str(run_copy), "--probes", "attention,nonsense"])
    assert result.exit_code == 2 and "nonsense" in result.output
    result = CliRunner().invoke(app, ["probe", str(run_copy), "--steps", "30"])
    assert result.exit_code == 2 and "30" in result.output


def test_steps_range_selects_the_checkpoints_in_it_and_an_empty_range_is_refused(run_copy):
    drop_checkpoint_rows(run_copy)
    result = CliRunner().invoke(app, ["probe", str(run_copy), "--probes", "attention", "--steps", "20-45,80"])
    assert result.exit_code == 0, result.output
    assert sorted(checkpoint_rows(run_copy)["step"].unique()) == [20, 40, 80]
    result = CliRunner().invoke(app, ["probe", str(run_copy), "--steps", "41-59"])
    assert result.exit_code == 2 and "no checkpoint in that range" in result.output
