"""Essential dynamics: the PCA trajectory of a model's outputs across checkpoints, read against a random-walk null."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import phaselens as pl
from phaselens.analysis.essential_dynamics import (NullSettings, essential_trajectory, nearest_distances,
                                                   pca_over_checkpoints, random_walk_fraction, random_walks)
from phaselens.errors import ConfigError
from phaselens.posthoc.runner import run_probes
from phaselens.store.essential_dynamics import PROBE, read_outputs, read_trajectory

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "essential-dynamics.md"
QUICK_NULL = NullSettings(walks=600)


def walk(n: int, dimension: int, seed: int) -> np.ndarray:
    """A random walk of n points with unit Gaussian steps: (n, dimension)."""
    return np.cumsum(np.random.default_rng(seed).standard_normal((n, dimension)), axis=0)


def test_a_random_walks_pca_explains_6_over_pi_squared_k_squared_in_component_k():
    walks = np.cumsum(np.random.default_rng(0).standard_normal((200, 100, 200)), axis=1)  # (walks, n, D)
    _, explained = pca_over_checkpoints(walks)
    mean = explained.mean(axis=0)
    for k in (1, 2, 3):
        assert mean[k - 1] == pytest.approx(random_walk_fraction(k), rel=0.10), k


def test_random_walks_show_no_turning_point_beyond_the_null():
    # the null is family-wise at 5%: of 12 seeded random walks, fewer than one is expected to show a turn anywhere
    flagged = [seed for seed in range(12) if essential_trajectory(list(range(0, 3100, 100)), walk(31, 200, seed),
                                                                   settings=NullSettings(walks=400)).turning_points]
    assert len(flagged) <= 2, flagged


def test_one_sharp_turn_is_found_at_its_checkpoint_and_nowhere_else():
    rng = np.random.default_rng(1)
    a, b = np.eye(400)[0], -0.8 * np.eye(400)[0] + 0.6 * np.eye(400)[1]  # a turn of about 143 degrees
    steps = [a] * 15 + [b] * 15
    points = np.vstack([np.zeros(400), np.cumsum(steps, axis=0)]) + 0.02 * rng.standard_normal((31, 400))
    trajectory = essential_trajectory(list(range(0, 3100, 100)), points, settings=QUICK_NULL)
    assert trajectory.turning_points == [1500]
    assert trajectory.turning[15] > 120 and trajectory.turning[15] > trajectory.threshold[15]
    assert trajectory.explained[0] > random_walk_fraction(1)  # two straight legs: more in PC1 than a walk has


def test_a_walk_with_uneven_steps_is_its_own_null():
    """Slow late training is noise in PC space: walks with the trajectory's own step lengths calibrate it."""
    rng = np.random.default_rng(2)
    lengths = np.r_[np.full(10, 5.0), np.full(20, 0.05)]
    points = random_walks(lengths, 300, 1, rng)[0]
    assert essential_trajectory(list(range(31)), points, settings=QUICK_NULL).turning_points == []


def test_distances_count_checkpoints_to_the_nearest_turning_point():
    steps = list(range(0, 1600, 100))
    assert nearest_distances([1132, 300], [900], steps) == [(1132, 900, 2), (300, 900, 6)]
    assert nearest_distances([500], [], steps) == [(500, None, None)]


def test_bad_options_are_refused_with_the_reason_before_anything_loads():
    from phaselens.probes.plan import PlanContext, plan_probes

    with pytest.raises(ConfigError, match="output must be one of"):
        plan_probes(PlanContext(), "post_hoc", [PROBE], given={PROBE: {"output": "probs"}})


def test_the_probe_runs_post_hoc_only_on_the_probe_batch():
    from phaselens.probes.plan import PlanContext, plan_probes

    plan = plan_probes(PlanContext(), "post_hoc", [PROBE]).require()
    assert plan.routes == {PROBE: "probe"} and plan.run_files == []
    live = plan_probes(PlanContext(), "live", [PROBE])
    assert live.refused and "checkpoints only" in live.refused[0].reason


def test_probe_stores_vectors_rows_and_the_pca_and_the_report_draws_the_trajectory(run_copy):
    result = run_probes(run_copy, probes=[PROBE], progress=False)
    assert result.ok and result.measured == [0, 10, 20]
    vectors = read_outputs(run_copy)
    batch = pl.open_run(run_copy).probe_batch()
    assert [v.step for v in vectors] == [0, 10, 20]
    assert all(len(v.values) == int(batch.loss_mask.sum()) and max(v.values) <= 0 for v in vectors)  # log-probabilities
    run = pl.open_run(run_copy)
    rows = run.metrics(probe=PROBE, source="checkpoint")
    for metric in ("pc1", "pc2", "pc3", "logprob_mean"):
        assert sorted(rows[rows["metric"] == metric]["step"]) == [0, 10, 20], metric
    assert list(rows[rows["metric"] == "turning"]["step"]) == [10]  # a turn needs a step on each side
    stored = read_trajectory(run_copy)
    assert stored.steps == [0, 10, 20] and sum(stored.explained) == pytest.approx(1.0, abs=1e-4)
    assert stored.null_explained[0] == pytest.approx(6 / np.pi ** 2, rel=1e-4)
    # measured again with nothing new: the same PCA, not a new one
    assert run_probes(run_copy, probes=[PROBE], progress=False).measured == []
    assert read_trajectory(run_copy) == stored
    report = pl.write_report(run_copy).read_text()
    assert "## Essential dynamics" in report and "6/(π²k²)" in report
    assert (run_copy / "report" / "essential_dynamics.png").stat().st_size > 10_000
    assert (run_copy / "report" / "essential_turning.png").is_file()


def test_the_pca_is_redone_when_more_checkpoints_are_measured(run_copy):
    assert run_probes(run_copy, probes=[PROBE], steps=[0, 10], progress=False).ok
    assert read_trajectory(run_copy) is None  # two checkpoints: no trajectory yet
    run_probes(run_copy, probes=[PROBE], progress=False)
    assert read_trajectory(run_copy).steps == [0, 10, 20]
    assert len(list((run_copy / "artifacts" / "essential_dynamics_pca").iterdir())) == 1


def test_the_logits_option_records_a_fixed_subset_of_the_distribution(run_copy):
    run_probes(run_copy, probes=[PROBE], options={PROBE: {"output": "logits", "positions": 8, "vocab": 5}}, progress=False)
    (first, *rest) = read_outputs(run_copy)
    assert first.output == "logits" and first.positions == 8 and len(first.vocab) == 5 and len(first.values) == 40
    assert all(v.vocab == first.vocab for v in rest)


def test_the_dashboard_api_serves_the_trajectory(run_copy):
    from fastapi.testclient import TestClient

    from phaselens.server import build

    app, _ = build([run_copy])
    with TestClient(app, base_url="http://127.0.0.1:8050") as client:
        before = client.get(f"/api/runs/{run_copy.name}/essential").json()
        assert before["available"] is False  # not measured yet
        run_probes(run_copy, probes=[PROBE], progress=False)
        data = client.get(f"/api/runs/{run_copy.name}/essential").json()
    stored = read_trajectory(run_copy)
    assert data["available"] and data["stored"] and data["steps"] == [0, 10, 20]
    assert data["pc1"] == [row[0] for row in stored.coords] and data["turning"][0] is None
    assert data["null_explained"][:2] == stored.null_explained[:2]


@pytest.mark.slow
def test_the_dashboard_shows_the_trajectory_and_rings_the_scrubbed_checkpoint(browser, open_dashboard, run_copy):
    run_probes(run_copy, probes=[PROBE], progress=False)
    idle = "document.body.dataset.busy === '0'"
    with open_dashboard(browser, run=[run_copy]) as page:
        page.wait_for_function(f"window.phaselens.run === '{run_copy.name}' && {idle}")
        assert page.locator("#essential-view").is_visible()
        assert "Explained variance: PC1" in page.locator("#essential-summary").inner_text()
        ringed = "() => document.getElementById('essential-plot').data[4].x[0]"
        pc1 = [row[0] for row in read_trajectory(run_copy).coords]
        assert page.evaluate(ringed) == pytest.approx(pc1[2])  # the scrubber starts at the last checkpoint
        page.evaluate("""() => { const s = document.getElementById('step-slider');
            s.value = 0; s.dispatchEvent(new Event('input')); }""")
        page.wait_for_function(idle)
        assert page.evaluate(ringed) == pytest.approx(pc1[0])
        assert page.errors == []


def test_the_docs_example_runs_as_written(run_copy, tmp_path):
    blocks = re.findall(r"<!-- run by tests/test_essential_dynamics.py -->\n```(python|bash)\n(.*?)```", DOCS.read_text(), flags=re.S)
    bash = next(code for kind, code in blocks if kind == "bash" and "phaselens probe" in code)
    python = next(code for kind, code in blocks if kind == "python" and "essential" in code)
    from typer.testing import CliRunner

    from phaselens.cli import app

    for line in bash.strip().splitlines():
        if line.startswith("phaselens "):  # in this process: the commands as typed, without a second start-up
            result = CliRunner().invoke(app, line.replace("runs/demo", str(run_copy)).split()[1:])
            assert result.exit_code == 0, (line, result.output)
    namespace: dict = {}
    exec(python.replace("runs/demo", str(run_copy)), namespace)
    assert namespace["trajectory"].steps == [0, 10, 20]


@pytest.mark.slow
def test_on_the_demo_the_turning_points_sit_beside_the_stages_or_the_copy_loss_transitions(induced_run, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(induced_run, copy, ignore=shutil.ignore_patterns("report"))
    assert run_probes(copy, probes=[PROBE], progress=False).ok
    run = pl.open_run(copy)
    trajectory = read_trajectory(copy)
    assert trajectory.steps == run.checkpoint_steps()
    # the copy-loss drop moves the outputs more than anything else: PC1 holds more than a random walk's share
    assert trajectory.explained[0] > random_walk_fraction(1)
    from phaselens.analysis.stages import run_stages

    _, points = run_stages(run.metrics(), run.transitions())
    transitions = run.transitions(probe="loss", metric="copy")
    marks = points["llc"] or sorted(int(s) for s in transitions["step"])
    assert marks, "the demo has a copy-loss transition"
    distances = nearest_distances(marks, trajectory.turning_points, trajectory.steps)
    print("turning points", trajectory.turning_points, "against", "llc" if points["llc"] else "copy loss", distances)
    section = pl.write_report(copy).read_text().split("## Essential dynamics")[1]
    assert "| copy-loss transition |" in section or "| LLC stage boundary |" in section
