"""Circuits everywhere a probe runs: a `transformers.Trainer` run, the user's own loop, live in `phaselens train`, and
post-hoc on Ray. Each gives edge scores that `pl.open_run(...).edges()` reads (the artifact the report and the
dashboard read), at the steps it measured."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import phaselens as pl
from phaselens.errors import ConfigError
from phaselens.posthoc.runner import run_probes
from phaselens.probes.base import make_probe
from phaselens.store.circuit_artifact import EDGE_METRIC
from test_own_loop_run import fresh, own_loop
from test_trainer_callback import Sequences, _tiny_model, neox, readme_trainer_code  # noqa: F401  (neox: a fixture)

FEW = {"rows": 4}  # sequences of the pairs: enough for every edge to have a score, quick on a tiny model


def live_edges_equal_the_artifact(run: pl.Run, step: int) -> None:
    """The live `edge:` rows at `step` are the scores of the artifact's circuit method there (same weights, same pairs)."""
    artifact = run.circuit(step)
    assert artifact is not None, step
    live = run.metrics(probe="circuits", source="live")
    live = live[(live["step"] == step) & live["metric"].str.startswith(EDGE_METRIC)].set_index("metric")["value"]
    stored = {EDGE_METRIC + e.edge: e.scores[artifact.circuit_method] for e in artifact.edges}
    assert len(live) == len(stored) > 0
    assert all(live[k] == pytest.approx(v, abs=1e-6) for k, v in stored.items())


def test_a_trainer_callback_refuses_live_circuits_with_the_post_hoc_command_before_writing(tmp_path):
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True)
    callback = pl.TelemetryCallback(tmp_path / "run", probes=["loss", "circuits"])
    with pytest.raises(ConfigError, match=r"circuits graph.*phaselens probe RUN --probes circuits"):
        callback.on_train_begin(args, TrainerState(), None, model=_tiny_model())  # a Hugging Face model has no graph live
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a 4-step Trainer run, then circuits on its last checkpoint through TransformerBridge: 3-10 s on 2 cores
def test_a_trainer_runs_checkpoints_give_edges_to_open_run(neox, tmp_path):  # noqa: F811
    model_dir, dataset = neox
    exec(readme_trainer_code(model_dir, tmp_path, steps=4), {"dataset": dataset})
    assert run_probes(tmp_path / "run", probes=["circuits"], steps=[4], options={"circuits": FEW}, progress=False).ok
    edges = pl.open_run(tmp_path / "run").edges()
    assert set(edges["step"]) == {4} and set(edges["method"]) == {"exact", "eap", "eap_ig"}
    per = edges.groupby(["step", "method"]).size()
    # GPT-NeoX, 2 layers × 4 heads, parallel MLPs: its MLP reads the block's input, so no edge from a head of its layer
    assert per.nunique() == 1 and per.iloc[0] > 29 and "L0H1->L1H0.k" in set(edges["edge"]) and "L1H0->L1M" not in set(edges["edge"])
    assert edges["score"].map(math.isfinite).all() and edges["score"].abs().max() > 0


@pytest.mark.slow  # 6 steps of the own loop with circuits live every 3 steps: 1.5-6 s on 2 cores
def test_the_own_loop_with_live_circuits_writes_edges_that_open_run_reads(tmp_path):
    model, task = fresh()
    circuits = make_probe("circuits", patch="source", read="copy", every=3, **FEW)
    with pl.Telemetry(model, probes=["loss", circuits], run=tmp_path / "mine") as telemetry:
        own_loop(model, task, telemetry, steps=6)
    run = pl.open_run(tmp_path / "mine")
    edges = run.edges()
    assert sorted(edges["step"].unique()) == [0, 3] == sorted(run.metrics(probe="circuits")["step"].unique())
    assert edges.groupby(["step", "method"]).size().eq(29).all() and set(edges["method"]) == {"exact", "eap", "eap_ig"}
    for step in (0, 3):
        live_edges_equal_the_artifact(run, step)
    # one fixed batch at every step (the run's probe batch), so the dashboard patches an edge on the pairs it was scored on
    assert run.circuit(0).pairs == run.circuit(3).pairs
    from fastapi.testclient import TestClient

    from phaselens.server.app import create_app
    from phaselens.server.session import Session

    api = TestClient(create_app(Session([run.path]), local_only=False))
    answer = api.post("/api/circuits/patch", json={"run": run.path.name, "step": 0, "edge": "L0H1->L1H0.k"})
    assert answer.status_code == 200, answer.text  # the study declares no pairs: the stored record says them
    body = answer.json()
    assert (body["patch"], body["read"], body["sequences"]) == ("source", "copy", 4) and math.isfinite(body["change"])


@pytest.mark.slow  # a 20-step training run with circuits live every 5 steps, then its report: 4-5 s on 2 cores
def test_a_live_circuits_run_stores_edges_at_its_checkpoints_and_its_report_has_the_circuits_section(tmp_path):
    from typer.testing import CliRunner

    from phaselens.cli import app
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    config = load_config("induction", ["train.steps=20", "train.checkpoint_every=10", "telemetry.every=5"])
    config.telemetry.probes = [*config.telemetry.probes, "circuits"]
    config.telemetry.probe_options = {"circuits": {"every": 5, **FEW}}
    train(config, tmp_path / "run", progress=False)
    run = pl.open_run(tmp_path / "run")
    live = run.metrics(probe="circuits", source="live")
    assert sorted(live["step"].unique()) == [0, 5, 10, 15] and (EDGE_METRIC + "L0H1->L1H0.k") in set(live["metric"])
    edges = run.edges()  # the artifact the report and the dashboard read: written at every checkpoint
    assert sorted(edges["step"].unique()) == run.checkpoint_steps() == [0, 10, 20]
    assert edges.groupby(["step", "method"]).size().eq(29).all()
    live_edges_equal_the_artifact(run, 10)
    report = CliRunner().invoke(app, ["report", str(run.path)])
    assert report.exit_code == 0, report.output
    text = (run.path / "report" / "report.md").read_text()
    assert "## Circuits over training" in text and "Edge attribution at 3 checkpoints" in text
    assert (run.path / "report" / "circuit_graphs.png").stat().st_size > 10_000


@pytest.mark.slow  # a local Ray cluster's start, and circuits on a checkpoint both ways: 13-17 s on 2 cores
def test_post_hoc_circuits_on_ray_store_the_edge_rows_a_local_sweep_does(run_copy, tmp_path):
    pytest.importorskip("ray")
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    local = run_probes(run_copy, probes=["circuits"], steps=[20], options={"circuits": FEW}, progress=False)
    remote = run_probes(other, probes=["circuits"], steps=[20], backend="ray", workers=1, options={"circuits": FEW}, progress=False)
    assert local.ok and remote.ok
    a, b = (pl.open_run(path).edges().sort_values(["step", "edge", "method"]).reset_index(drop=True) for path in (run_copy, other))
    assert len(a) == 29 * 3 and set(a["step"]) == {20} and a["score"].abs().max() > 0
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-6)
