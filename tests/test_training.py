"""Training end to end: the run directory, resume after a kill, Ctrl-C, divergence, checkpoint values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import phaselens as pl
from phaselens.errors import TrainingDiverged
from phaselens.probes import make_probe
from phaselens.probes.measure import measure_model
from phaselens.training.config import load_config
from phaselens.training.trainer import train

SMALL = ["train.steps=60", "train.checkpoint_every=20", "train.eval_every=20"]
CLI = [sys.executable, "-m", "phaselens.cli"]


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def sorted_metrics(run_dir: Path) -> pd.DataFrame:
    frame = pl.open_run(run_dir).metrics()
    return frame.sort_values(["source", "probe", "metric", "step", "layer", "head"]).reset_index(drop=True)


def test_short_training_run_writes_the_run_directory(tmp_path):
    result = train(load_config("induction", SMALL), tmp_path / "run", progress=False)
    run = pl.open_run(tmp_path / "run")
    assert result.status == "finished" and run.status == "finished"
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["config"]["train"]["steps"] == 60 and "torch" in info["versions"]
    assert run.checkpoint_steps() == [0, 20, 40, 60]
    for step in run.checkpoint_steps():
        assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / f"step_{step:08d}").iterdir()) == [
            "model.safetensors", "trainer.json", "trainer.safetensors"]
    entropy = run.metrics(probe="attention", metric="entropy", source="live")
    # a row for every (logged step, layer, head): 60 steps x 2 layers x 2 heads
    assert len(entropy) == 60 * 2 * 2
    assert set(map(tuple, entropy[["step", "layer", "head"]].to_numpy().tolist())) == {
        (s, l, h) for s in range(60) for l in range(2) for h in range(2)}
    assert sorted(run.metrics(probe="loss", metric="eval")["step"]) == [0, 20, 40, 60]
    assert sorted(run.metrics(source="checkpoint", probe="heads", metric="induction")["step"].unique()) == [0, 20, 40, 60]
    assert not run.metrics().duplicated(["source", "probe", "metric", "step", "layer", "head"]).any()


def test_checkpoint_values_equal_a_post_hoc_measurement_of_the_checkpoint(tmp_path):
    train(load_config("induction", SMALL), tmp_path / "run", progress=False)
    run = pl.open_run(tmp_path / "run")
    probes = [make_probe(name) for name in ("attention", "heads", "loss")]
    logged = run.metrics(source="checkpoint")
    for step in (20, 60):
        results = measure_model(run.load_model(step), run.probe_batch(), probes)
        for probe, measurements in results:
            for m in measurements:
                rows = logged[(logged.step == step) & (logged.probe == probe) & (logged.metric == m.metric)]
                values = m.value.reshape(-1).tolist()
                if m.value.dim() == 1 and m.metric == "specialization":
                    rows = rows[rows["head"].isna()]
                elif m.metric == "specialization":
                    rows = rows[rows["head"].notna()]
                assert rows["value"].tolist() == pytest.approx(values, abs=1e-5), (step, probe, m.metric)


def test_resume_after_kill_gives_identical_metrics(tmp_path):
    args = ["train", "induction", "train.steps=120", "train.checkpoint_every=40", "train.eval_every=20"]
    whole = cli(*args, "--out", str(tmp_path / "whole"))  # side by side with the run it kills: one thread each
    killed = cli(*args, "--out", str(tmp_path / "killed"))
    wait_for(tmp_path / "killed" / "checkpoints" / "step_00000080", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    a, b = sorted_metrics(tmp_path / "whole"), sorted_metrics(tmp_path / "killed")
    assert len(a) == len(b)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert not b.duplicated(["source", "probe", "metric", "step", "layer", "head"]).any()
    assert pl.open_run(tmp_path / "killed").status == "finished"
    for step in (40, 80, 120):  # and the weights themselves
        wa = pl.open_run(tmp_path / "whole").load_model(step).state_dict()
        wb = pl.open_run(tmp_path / "killed").load_model(step).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "induction", "train.steps=5000", "train.checkpoint_every=50", "--out", str(out))
    wait_for(out / "checkpoints" / "step_00000050", proc)
    time.sleep(0.5)  # stop between checkpoints
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "--resume" in output and "checkpoint and metrics up to it are saved" in output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "stopped" and "interrupted" in info["stop_reason"]  # resumable, not failed
    steps = pl.open_run(out).checkpoint_steps()
    assert steps[-1] == info["steps_done"] >= 50  # a checkpoint where it stopped


def test_nan_loss_stops_training_with_a_clear_error(tmp_path):
    config = load_config("induction", ["train.steps=200", "train.lr=1e12", "train.grad_clip=0", "train.checkpoint_every=100"])
    with pytest.raises(TrainingDiverged, match=r"at step \d+.*train\.lr"):
        train(config, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "train.lr" in info["stop_reason"]


def test_training_into_an_existing_run_refuses_without_resume(tmp_path):
    train(load_config("induction", ["train.steps=5", "train.checkpoint_every=5"]), tmp_path / "run", progress=False)
    with pytest.raises(pl.RunError, match="--resume"):
        train(load_config("induction", ["train.steps=5", "train.checkpoint_every=5"]), tmp_path / "run", progress=False)
