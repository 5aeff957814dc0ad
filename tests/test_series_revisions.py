"""Imported checkpoint series at scale: one boot with weights swapped in, content hashes and identical
revisions, device and precision, and sweeps that survive a kill or a damaged revision."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import phaselens as pl
from phaselens.cli import app
from phaselens.models.hf import boot_revision
from phaselens.posthoc.runner import run_probes
from phaselens.series import import_hf
from phaselens.series.revisions import RevisionLoader
from phaselens.series.toy import save_toy_series

STEPS = (0, 10, 20, 30, 40)
TEXT = "\n".join(" ".join(f"w{(7 * i + 3 * j) % 40}" for j in range(12)) for i in range(200))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Five revisions of a tiny GPT-NeoX (fresh seeded weights each), saved as safetensors."""
    root = tmp_path_factory.mktemp("series")
    (root / "probe.txt").write_text(TEXT)
    return save_toy_series(root / "model", TEXT, steps=STEPS, train=False)


@pytest.fixture
def series_copy(model_dir, tmp_path):
    """A private copy of the saved series, which a test may damage."""
    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "probe.txt").write_text(TEXT)
    return tmp_path / "model", tmp_path / "probe.txt"


def revisions(steps=STEPS) -> list[str]:
    return [f"step{s}" for s in steps]


def invoke(*args, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def test_weights_swapped_into_one_booted_model_equal_a_fresh_boot_of_each_revision(model_dir, tmp_path):
    # a revision with another architecture (wider) is booted fresh, with a note that says why
    wide = save_toy_series(tmp_path / "wide", TEXT, steps=(50,), train=False, d_model=48)
    shutil.copytree(wide / "step50", tmp_path / "step50")
    references = {s: (str(model_dir), f"step{s}", True) for s in STEPS}
    references[50] = (str(tmp_path), "step50", True)
    loader = RevisionLoader(references)
    tokens = torch.randint(0, 40, (2, 12))
    booted = None
    for step, ahead in ((0, 10), (10, 20), (20, None), (0, 40), (40, 50), (50, None)):
        loaded = loader.model_at(step, ahead)
        if step != 50:
            booted = booted or loaded.model
            assert loaded.model is booted and loaded.note is None  # one model for the whole series
        else:
            assert "architecture differs" in loaded.note and "hidden_size 32 → 48" in loaded.note
        fresh = boot_revision(*references[step])
        with torch.no_grad():
            assert torch.equal(loaded.model(tokens), fresh(tokens)), f"step {step}"
    loader.close()


def test_identical_revisions_are_named_by_the_run_the_cli_and_the_report(series_copy, tmp_path):
    model, text = series_copy
    shutil.rmtree(model / "step30")
    shutil.copytree(model / "step40", model / "step30")  # step30 serves step40's weights, as Pythia's late branches do
    out = tmp_path / "run"
    printed = invoke("import-hf", model, "--revisions", ",".join(revisions()), "--out", out, "--text", text, "--seq-len", 12, "--sequences", 4)
    line = "steps 30–40: identical weights to step 40; their curves are flat by construction"
    assert line in printed
    run = pl.open_run(out)
    assert run.info["imported"]["identical"] == [{"steps": [30, 40], "same_as": 40}]
    assert len(set(run.info["imported"]["weights_sha256"].values())) == 4
    assert run.identical_steps() == {30: 40} and run.identical_revisions() == [line]

    assert line in invoke("probe", out, "--probes", "loss,attention")
    loss = run.metrics(probe="loss", metric="all").set_index("step")["value"]
    assert loss[30] == loss[40] and loss[20] != loss[40]
    invoke("report", out)
    assert line in (out / "report" / "report.md").read_text()


def test_a_truncated_or_missing_revision_is_recorded_failed_and_the_sweep_goes_on(series_copy, tmp_path):
    model, text = series_copy
    weights = model / "step10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = import_hf(model, tmp_path / "run", revisions=revisions(), text=text, seq_len=12, sequences=4)
    (model / "step30" / "model.safetensors").unlink()

    result = CliRunner().invoke(app, ["probe", str(out), "--probes", "loss"])
    assert result.exit_code == 1
    assert "2 checkpoint(s) failed" in result.output and "step 10:" in result.output and "truncated or corrupt" in result.output
    run = pl.open_run(out)
    assert sorted(run.metrics(probe="loss")["step"].unique()) == [0, 20, 40]
    failures = run._store.failures().set_index("step")["reason"]
    assert "truncated or corrupt" in failures[10] and "step30" in failures[30]


CHILD = """
import os, signal, sys
import phaselens.posthoc.runner as runner
runner.COMMIT_SECONDS = 0.0  # commit after every revision
measure = runner.measure_checkpoint
def measure_then_die(run_path, step, *args):
    if step == 30:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-series, as by the OOM killer or ^C twice
    return measure(run_path, step, *args)
runner.measure_checkpoint = measure_then_die
runner.run_probes(sys.argv[1], ["loss", "logit_lens"], progress=False)
"""


@pytest.mark.slow  # a child process that imports torch and transformers: ~20 s on 2 busy cores
def test_a_killed_series_sweep_resumes_without_recomputing_finished_revisions(model_dir, tmp_path):
    out = import_hf(model_dir, tmp_path / "run", revisions=revisions(), text=model_dir.parent / "probe.txt",
                    seq_len=12, sequences=4)
    killed = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    run = pl.open_run(out)
    done = sorted(run.metrics(source="checkpoint")["step"].unique())
    assert done == [0, 10, 20]
    before = run.metrics(source="checkpoint")

    result = run_probes(out, ["loss", "logit_lens"], progress=False)
    assert result.ok and result.measured == [30, 40] and result.skipped == 2 * len(done)
    after = run.metrics(source="checkpoint")
    assert sorted(after["step"].unique()) == list(STEPS)
    assert after[after["step"] <= 20].reset_index(drop=True).equals(before.reset_index(drop=True))


def test_probe_runs_in_bfloat16_and_refuses_a_device_it_does_not_have(model_dir, tmp_path):
    out = import_hf(model_dir, tmp_path / "run", revisions=revisions((0, 40)), text=model_dir.parent / "probe.txt",
                    seq_len=12, sequences=4, dtype="bfloat16")
    assert json.loads((out / "run.json").read_text())["imported"]["dtype"] == "bfloat16"
    invoke("probe", out, "--probes", "loss,logit_lens")  # in bfloat16, the dtype import-hf was given
    half = pl.open_run(out).metrics(probe="logit_lens").set_index(["step", "metric", "layer"])["value"]
    full_run = import_hf(model_dir, tmp_path / "full", revisions=revisions((0, 40)), text=model_dir.parent / "probe.txt",
                         seq_len=12, sequences=4)
    invoke("probe", full_run, "--probes", "loss,logit_lens", "--dtype", "float32", "--device", "cpu")
    full = pl.open_run(full_run).metrics(probe="logit_lens").set_index(["step", "metric", "layer"])["value"]
    assert half.notna().all() and not half.equals(full)
    assert (half - full).abs().max() < 0.05  # bfloat16 weights, float32 reductions: close to float32

    if not torch.cuda.is_available():
        assert "no CUDA device" in invoke("probe", out, "--device", "cuda", code=2)
    assert "choose one of float32, bfloat16, float16" in invoke("probe", out, "--dtype", "float64", code=2)


def test_the_dashboard_leaves_identical_revisions_out_of_transitions_as_the_run_does(tmp_path):
    """Pythia-like: steps 60–100 serve step 110's weights. A head score that jumps at step 60 only
    jumps because of those copies, so neither `run.transitions()` nor the dashboard reports it."""
    from fastapi.testclient import TestClient

    from phaselens.server import build
    from phaselens.store.metrics import MetricsStore

    steps = list(range(0, 120, 10))
    model = save_toy_series(tmp_path / "model", TEXT, steps=(0, 10, 20, 30, 40, 50, 110), train=False)
    for step in range(60, 110, 10):
        shutil.copytree(model / "step110", model / f"step{step}")
    (tmp_path / "probe.txt").write_text(TEXT)
    out = import_hf(model, tmp_path / "run", revisions=revisions(steps), text=tmp_path / "probe.txt", seq_len=12, sequences=2)
    run = pl.open_run(out)
    assert run.identical_steps() == {step: 110 for step in range(60, 110, 10)}
    store = MetricsStore(out / "metrics.sqlite")  # a head score whose copies repeat step 110's value
    store.write([(s, "heads", "induction", 1, 0, (1.0 if s >= 60 else 0.0) + 0.01 * math.sin(s), "checkpoint") for s in steps])
    store.close()
    every_row = pl.detect_transitions(run.metrics())
    assert len(every_row) == 1 and 50 <= every_row["step"][0] <= 60  # what counting the copies would report

    app, _ = build([out])
    with TestClient(app, base_url="http://127.0.0.1:8050") as client:
        served = client.get(f"/api/runs/{out.name}/transitions")
        stages = client.get(f"/api/runs/{out.name}/stages")
    assert served.status_code == 200 and stages.status_code == 200
    assert served.json()["transitions"] == [] and run.transitions().empty
