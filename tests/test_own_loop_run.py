"""`pl.Telemetry` in the user's own loop: with `run=DIR` it writes a run that `pl.open_run`, `phaselens report`,
`serve`, `export` and `probe` read; with `store=` its `dataframe()` reads back the store it wrote."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import phaselens as pl
from phaselens.cli import app
from phaselens.server import build

STEPS = 11


def own_loop(model, task, telemetry, steps=STEPS, fail_at=None):
    """The documented loop (fewer steps), saving a checkpoint every 10 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = task.sample(16, rng)
        with telemetry.step(step, batch):
            logits = model(batch.tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), batch.tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        if step % 10 == 0:
            telemetry.checkpoint(step)
        if step == fail_at:
            raise RuntimeError("the user's loop broke")


def fresh():
    torch.manual_seed(0)
    model = pl.build_model(pl.ModelConfig(n_layers=2, n_heads=2, d_model=64, d_vocab=64, n_ctx=64))
    return model, pl.InductionTask(seq_len=64, vocab=64)


def test_an_own_loop_run_is_read_like_any_run(tmp_path):
    model, task = fresh()
    with pl.Telemetry(model, probes=["attention", "heads", "loss"], run=tmp_path / "mine") as telemetry:
        own_loop(model, task, telemetry)
        frame = telemetry.dataframe()
    run = pl.open_run(tmp_path / "mine")
    assert run.status == "finished" and run.task == "own_loop" and run.checkpoint_steps() == [0, 10]
    stored = run.metrics()
    assert len(stored) == len(frame) > 0 and sorted(stored["step"].unique()) == list(range(STEPS))
    assert set(stored["probe"]) == {"attention", "heads", "loss"}
    assert run.probe_batch().tokens.shape == (16, 64)

    runner = CliRunner()
    report = runner.invoke(app, ["report", str(run.path)])
    assert report.exit_code == 0, report.output
    text = (run.path / "report" / "report.md").read_text()
    assert "own_loop" in text and "loss on the measured batches" in text
    probed = runner.invoke(app, ["probe", str(run.path), "--probes", "loss"])
    assert probed.exit_code == 0, probed.output
    assert set(pl.open_run(run.path).metrics(prefer="checkpoint").query("source == 'checkpoint'")["step"]) == {0, 10}
    exported = runner.invoke(app, ["export", str(run.path), "--out", str(tmp_path / "rows.csv")])
    assert exported.exit_code == 0 and (tmp_path / "rows.csv").stat().st_size > 0, exported.output

    served, _ = build([run.path])
    with TestClient(served, base_url="http://127.0.0.1:8050") as client:
        listed = client.get("/api/runs").json()
        assert [r["name"] for r in listed["runs"]] == ["mine"], listed
        series = client.get("/api/runs/mine/series")
        assert series.status_code == 200 and series.json()


def test_a_store_is_read_back_and_a_broken_loop_marks_its_run_failed(tmp_path):
    model, task = fresh()
    with pl.Telemetry(model, probes=["loss"], store=tmp_path / "metrics.sqlite") as telemetry:
        own_loop(model, task, _NoCheckpoint(telemetry), steps=5)
        frame = telemetry.dataframe()  # raised "this Telemetry writes to a store" before
    assert sorted(frame["step"].unique()) == [0, 1, 2, 3, 4] and set(frame["probe"]) == {"loss"}

    with pytest.raises(RuntimeError, match="loop broke"):
        with pl.Telemetry(model, probes=["loss"], run=tmp_path / "broken") as telemetry:
            own_loop(model, task, telemetry, fail_at=3)
    record = pl.open_run(tmp_path / "broken").record
    assert record.status == "failed" and "loop broke" in record.stop_reason and record.steps_done == 3
    with pytest.raises(pl.RunError, match="already holds a run"):
        pl.Telemetry(model, probes=["loss"], run=tmp_path / "broken")
    with pytest.raises(pl.ConfigError, match="not both"):
        pl.Telemetry(model, probes=["loss"], run=tmp_path / "x", store=tmp_path / "y.sqlite")


class _NoCheckpoint:
    """A Telemetry with a store and no run: the loop's checkpoint calls are skipped."""

    def __init__(self, telemetry):
        self.telemetry = telemetry

    def step(self, *args, **kwargs):
        return self.telemetry.step(*args, **kwargs)

    def checkpoint(self, step):
        return None
