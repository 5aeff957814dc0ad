"""One live-or-checkpoint rule (`phaselens.signals.sources.prefer_source`): `Run.metrics(prefer=...)`,
`Run.transitions()`' source column and the dashboard's metrics route all choose the same rows.

The run is written by our own writers: a run.json record and a metrics store holding
- loss/train measured both ways at the same steps (live every step 0..59, checkpoint at 0, 10, ..., 50),
  live flat then dropping at step 30, checkpoint flat (the probe batch never moved);
- logit_lens/p_correct per layer, checkpoint only, rising at step 30;
- attention/entropy of L0H1, live only.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

import phaselens as pl
from phaselens.server import build
from phaselens.signals.sources import prefer_source
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import RunRecord
from phaselens.training.config import load_config

LIVE_STEPS = range(0, 60)
CHECKPOINT_STEPS = range(0, 60, 2)
LOCAL = "http://127.0.0.1:8050"


def _step(steps, low: float, high: float, at: int = 30) -> list[float]:
    noise = np.random.default_rng(0).normal(0, 0.01, len(steps))
    return [(high if s >= at else low) + n for s, n in zip(steps, noise)]


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefer") / "run"
    RunDir(path).write(RunRecord(name="prefer", status="finished", config=load_config("induction", []).to_dict()))
    store = MetricsStore(RunDir(path).metrics_db)
    rows = [(s, "loss", "train", None, None, v, "live") for s, v in zip(LIVE_STEPS, _step(LIVE_STEPS, 4.0, 1.0))]
    rows += [(s, "loss", "train", None, None, v, "checkpoint") for s, v in zip(CHECKPOINT_STEPS, _step(CHECKPOINT_STEPS, 4.0, 4.0))]
    for layer in (0, 1):
        rows += [(s, "logit_lens", "p_correct", layer, None, v, "checkpoint")
                 for s, v in zip(CHECKPOINT_STEPS, _step(CHECKPOINT_STEPS, 0.1, 0.8))]
    rows += [(s, "attention", "entropy", 0, 1, v, "live") for s, v in zip(LIVE_STEPS, _step(LIVE_STEPS, 2.0, 2.0))]
    store.write(rows)
    store.close()
    import torch

    from phaselens.tasks.batch import TaskBatch

    TaskBatch.coerce(torch.arange(32).reshape(2, 16) % 64).save(RunDir(path).probe_batch)  # the dashboard's sample text
    return path


def _sources(frame) -> dict[tuple, set]:
    """(probe, metric, layer) -> the sources among the frame's rows (layer -1: a per-model series)."""
    frame = frame.assign(layer=frame["layer"].fillna(-1).astype(int))
    return {key: set(group["source"]) for key, group in frame.groupby(["probe", "metric", "layer"])}


def test_by_default_metrics_returns_every_row_of_both_sources_each_labelled(run_path):
    rows = pl.open_run(run_path).metrics(probe="loss", metric="train")
    assert len(rows) == len(LIVE_STEPS) + len(CHECKPOINT_STEPS)
    assert set(rows.loc[rows["step"] == 10, "source"]) == {"live", "checkpoint"}  # one step, measured both ways


@pytest.mark.parametrize("prefer, both_sources_series", [("live", "live"), ("checkpoint", "checkpoint"), ("densest", "live")])
def test_prefer_picks_one_source_per_series_and_falls_back_for_a_series_with_only_the_other(run_path, prefer,
                                                                                            both_sources_series):
    rows = pl.open_run(run_path).metrics(prefer=prefer)
    sources = _sources(rows)
    assert sources[("loss", "train", -1)] == {both_sources_series}
    assert sources[("logit_lens", "p_correct", 0)] == sources[("logit_lens", "p_correct", 1)] == {"checkpoint"}
    assert sources[("attention", "entropy", 0)] == {"live"}
    loss = rows[rows["probe"] == "loss"]
    assert loss["step"].is_unique  # one curve: no step twice
    assert len(loss) == (len(LIVE_STEPS) if both_sources_series == "live" else len(CHECKPOINT_STEPS))


def test_densest_prefers_the_checkpoint_curve_when_it_has_as_many_steps(run_path):
    rows = pl.open_run(run_path).metrics(probe="loss", metric="train")
    even = rows[rows["step"].isin(list(CHECKPOINT_STEPS))]  # both sources at the same 30 steps
    assert set(prefer_source(even, "densest")["source"]) == {"checkpoint"}


def test_an_unknown_preference_is_refused_with_the_choices(run_path):
    with pytest.raises(ValueError, match="'live', 'checkpoint', 'densest', None"):
        pl.open_run(run_path).metrics(prefer="newest")


def test_each_transition_names_the_curve_it_was_found_on(run_path):
    run = pl.open_run(run_path)
    found = run.transitions()
    loss = found[found["probe"] == "loss"]
    assert len(loss) == 1 and loss["source"].iloc[0] == "live" and 25 <= loss["step"].iloc[0] <= 35
    lens = found[found["probe"] == "logit_lens"]
    assert sorted(lens["layer"]) == [0, 1] and set(lens["source"]) == {"checkpoint"}
    assert found[found["probe"] == "attention"].empty  # a flat series has none
    # the checkpoint curve of the loss is flat: preferring it finds no loss transition
    assert run.transitions(probe="loss", prefer="checkpoint").empty
    both = run.transitions(probe="loss", prefer=None)  # both curves searched, each on its own
    assert list(both["source"]) == ["live"]


@pytest.fixture(scope="module")
def client(run_path):
    app, _ = build([run_path])
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def test_the_metrics_route_applies_the_same_rule_as_run_metrics(client, run_path):
    run = pl.open_run(run_path)
    for prefer in ("live", "checkpoint", "densest"):
        body = client.get(f"/api/runs/{run_path.name}/metrics", params={"prefer": prefer}).json()
        expected = run.metrics(prefer=prefer)
        assert body["prefer"] == prefer
        assert sorted(zip(body["step"], body["probe"], body["source"])) == sorted(
            zip(expected["step"], expected["probe"], expected["source"]))
    every = client.get(f"/api/runs/{run_path.name}/metrics", params={"probe": "loss"}).json()
    assert every["prefer"] is None and set(every["source"]) == {"live", "checkpoint"}


def test_the_metrics_route_refuses_an_unknown_preference(client, run_path):
    assert client.get(f"/api/runs/{run_path.name}/metrics", params={"prefer": "newest"}).status_code == 422


def test_the_transitions_route_carries_the_source(client, run_path):
    rows = client.get(f"/api/runs/{run_path.name}/transitions").json()["transitions"]
    assert {(r["probe"], r["source"]) for r in rows} == {("loss", "live"), ("logit_lens", "checkpoint")}


@pytest.mark.slow  # a browser: several seconds
def test_the_dashboard_timeline_draws_the_curve_the_api_chose(browser, open_dashboard, run_path):
    idle = "document.body.dataset.busy === '0'"
    with open_dashboard(browser, run=[run_path]) as page:
        page.select_option("#metric-select", "loss/train")
        page.wait_for_function(idle)
        traces = page.evaluate("""() => document.getElementById('timeline-plot').data
            .map((t) => ({name: t.name, source: t.source, steps: t.x.filter((x) => x !== null).length}))""")
        curves = [t for t in traces if t["steps"]]  # legend entries for shapes are empty traces
        expected = pl.open_run(run_path).metrics(probe="loss", metric="train", prefer="densest")
        assert curves == [{"name": "model", "source": "live", "steps": len(expected)}]
        assert "detected transition (window, step dashed)" in {t["name"] for t in traces}
        assert page.errors == []
