"""The `llc` probe: SGLD estimates of the local learning coefficient, their diagnostics, and the probe over checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from phaselens.probes.llc import LLCEstimator, SGLDOptions


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: one torch thread is fastest (and two thrash on a shared two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def half_mse(call, rows):
    """Negative log-likelihood per sample of y = x·w + N(0, 1), up to a constant."""
    return 0.5 * ((call(rows["x"]).squeeze(-1) - rows["y"]) ** 2).mean()


def linear_regression(d: int, n: int, offset: float = 0.0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A linear model at its least-squares fit (plus `offset` on every weight) on n Gaussian samples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T + offset)
    return model, {"x": x, "y": y}


def test_llc_of_linear_regression_is_half_its_parameter_count():
    d, n = 10, 2000
    model, sample = linear_regression(d, n)
    options = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=8, draws=600, burnin=200, batch_size=500, n=n)
    result = LLCEstimator(model, half_mse, sample, options).estimate()
    assert result.llc == pytest.approx(d / 2, rel=0.15)
    assert result.llc_std > 0 and len(result.chain_llc) == 8
    assert result.traces.shape == (8, 800)
    assert result.warnings == []
    assert result.n_beta == pytest.approx(n / np.log(n))


def test_llc_is_deterministic_for_a_seed_and_batched_chains_equal_sequential_ones():
    model, sample = linear_regression(4, 500)
    options = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=3, draws=40, burnin=10, batch_size=50, n=500, seed=3)
    first = LLCEstimator(model, half_mse, sample, options).estimate()
    again = LLCEstimator(model, half_mse, sample, options).estimate()
    one_by_one = LLCEstimator(model, half_mse, sample, options).estimate(batched=False)
    other_seed = LLCEstimator(model, half_mse, sample, SGLDOptions(**{**options.__dict__, "seed": 4})).estimate()
    assert first.batched and not one_by_one.batched
    assert np.array_equal(first.traces, again.traces) and first.llc == again.llc
    np.testing.assert_allclose(one_by_one.traces, first.traces, rtol=1e-4)
    assert not np.allclose(other_seed.traces, first.traces)
    weights = model.weight.detach().clone()
    LLCEstimator(model, half_mse, sample, options).estimate()
    assert torch.equal(model.weight, weights)  # w* is left as it was


def test_a_calibration_grid_runs_together_the_chains_the_probe_runs_at_each_setting():
    model, sample = linear_regression(4, 500)
    options = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=3, draws=30, burnin=10, batch_size=50, n=500, seed=2)
    grid = [(1e-4, 1.0), (3e-4, 10.0), (5.0, 1.0)]  # the last diverges: it must not disturb the others
    done = []
    together = LLCEstimator(model, half_mse, sample, options).estimate_grid(grid, progress=done.append)
    assert done == list(range(1, 41))  # one call per SGLD step, for all settings at once
    for (epsilon, gamma), joint in zip(grid, together):
        alone = LLCEstimator(model, half_mse, sample, SGLDOptions(**{**options.__dict__, "epsilon": epsilon, "gamma": gamma})).estimate()
        assert (joint.options.epsilon, joint.options.gamma) == (epsilon, gamma) and joint.traces.shape == (3, 40)
        np.testing.assert_allclose(joint.traces, alone.traces, rtol=1e-5)
        assert joint.warnings == alone.warnings
    assert not any("diverged" in w for w in together[0].warnings + together[1].warnings)
    assert any("diverged" in w for w in together[2].warnings)
    assert together[0].llc != pytest.approx(together[1].llc, rel=1e-3)


def test_diagnostics_name_divergence_negative_llc_and_an_unsettled_trace():
    model, sample = linear_regression(4, 500)
    diverged = LLCEstimator(model, half_mse, sample, SGLDOptions(epsilon=0.5, chains=2, draws=20, burnin=0, batch_size=50, n=500)).estimate()
    assert any("diverged" in w for w in diverged.warnings)

    off_minimum, sample = linear_regression(4, 500, offset=1.0)  # w* far from the minimum: the chains roll downhill
    options = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=2, draws=100, burnin=20, batch_size=100, n=500)
    negative = LLCEstimator(off_minimum, half_mse, sample, options).estimate()
    assert negative.llc < 0
    assert any("< 0" in w for w in negative.warnings)

    model, sample = linear_regression(50, 500)  # relaxes over ~250 steps at this step size
    unsettled = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=4, draws=200, burnin=0, batch_size=500, n=500)
    assert any("still rising after burn-in" in w for w in LLCEstimator(model, half_mse, sample, unsettled).estimate().warnings)
    settled = SGLDOptions(**{**unsettled.__dict__, "burnin": 800})
    assert LLCEstimator(model, half_mse, sample, settled).estimate().warnings == []


def test_llc_probe_measures_every_checkpoint_on_the_runs_stored_training_sample(run_copy):
    from phaselens.posthoc.runner import run_probes
    from phaselens.run import open_run
    from phaselens.store.run_dir import RunDir

    options = {"llc": {"chains": 2, "draws": 6, "burnin": 2, "batch_size": 4, "n": 32, "seed": 1}}
    result = run_probes(run_copy, ["llc"], options=options, progress=False)
    assert result.ok and result.measured == [0, 10, 20]
    sample = RunDir(run_copy).training_sample(32, 1)
    assert sample.is_file()
    rows = open_run(run_copy).metrics(probe="llc")
    assert sorted(rows["metric"].unique()) == ["llc", "llc_se", "llc_std"]
    assert rows.groupby("metric")["step"].apply(list).to_dict() == {m: [0, 10, 20] for m in ("llc", "llc_se", "llc_std")}
    assert rows["layer"].isna().all() and np.isfinite(rows["value"]).all()
    artifact = json.loads((run_copy / "artifacts" / "llc" / "step_00000020.json").read_text())
    assert np.array(artifact["traces"]).shape == (2, 8)
    assert artifact["options"]["chains"] == 2 and artifact["init_loss"] > 0
    llc = rows[(rows["metric"] == "llc") & (rows["step"] == 20)]["value"].item()
    assert llc == pytest.approx(artifact["llc"], rel=1e-5)
    assert llc == pytest.approx(np.mean(artifact["chain_llc"]), rel=1e-5)
    se = rows[(rows["metric"] == "llc_se") & (rows["step"] == 20)]["value"].item()
    assert se == pytest.approx(np.std(artifact["chain_llc"], ddof=1) / np.sqrt(2), rel=1e-5)  # ddof 1, over √C


def test_llc_probe_runs_its_chains_on_one_cpu_thread_and_gives_the_threads_back(run_copy):
    from phaselens.probes.base import ProbeInputs
    from phaselens.run import open_run
    from phaselens.run_files import ensure_run_files

    options = {"chains": 2, "draws": 3, "burnin": 1, "batch_size": 4, "n": 32}
    plan = open_run(run_copy).plan(["llc"], {"llc": options}).require()
    ensure_run_files(open_run(run_copy), plan)
    probe = plan.probes[0].make()
    probe.bind_run(run_copy)
    model = open_run(run_copy).load_model(20)
    threads_seen = []
    model.register_forward_hook(lambda *_: threads_seen.append(torch.get_num_threads()))  # the chains' copies keep it
    torch.set_num_threads(2)
    measured = probe.compute(ProbeInputs(acts={}, batch=probe.sample, model=model))
    assert [m.metric for m in measured] == ["llc", "llc_se", "llc_std"]
    assert len(threads_seen) > 4 and set(threads_seen) == {1}  # two threads thrash on a busy machine
    assert torch.get_num_threads() == 2


def test_llc_probe_refuses_an_unknown_or_bad_option():
    from phaselens.errors import ConfigError
    from phaselens.probes.base import make_probe

    with pytest.raises(ConfigError, match="unknown option.*chian"):
        make_probe("llc", chian=4)
    with pytest.raises(ConfigError, match="epsilon must be > 0"):
        make_probe("llc", epsilon=0)
    with pytest.raises(ConfigError, match="draws=.*not a number"):
        make_probe("llc", draws="many")


def invoke(*args):
    from typer.testing import CliRunner

    from phaselens.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


TINY = ["--probe-option", "llc.chains=2", "--probe-option", "llc.draws=6", "--probe-option", "llc.burnin=2",
        "--probe-option", "llc.batch_size=4", "--probe-option", "llc.n=32"]


def test_probe_command_takes_llc_options_and_warns_when_chains_diverge(run_copy):
    result = invoke("probe", run_copy, "--probes", "llc", "--steps", "20", *TINY, "--probe-option", "llc.epsilon=10")
    assert result.exit_code == 0, result.output
    assert "warning: llc at step 20: 2 of 2 SGLD chains diverged" in result.output
    assert f"phaselens llc-calibrate {run_copy} --step 20" in result.output
    artifact = json.loads((run_copy / "artifacts" / "llc" / "step_00000020.json").read_text())
    assert artifact["options"]["epsilon"] == 10 and artifact["options"]["chains"] == 2
    bad = invoke("probe", run_copy, "--probes", "llc", "--probe-option", "llc.chains")
    assert bad.exit_code == 2 and "must look like" in bad.output
    unknown = invoke("probe", run_copy, "--probes", "llc", "--probe-option", "llc.chians=2")
    assert unknown.exit_code == 2 and "unknown option(s) ['chians']" in unknown.output


def test_llc_calibrate_draws_the_grid_and_recommends_the_middle_of_the_healthy_plateau(run_copy):
    result = invoke("llc-calibrate", run_copy, "--step", "20", "--epsilons", "3e-4,1e-3,10", "--gammas", "100", *TINY,
                    "--probe-option", "llc.burnin=40", "--probe-option", "llc.draws=20")
    assert result.exit_code == 0, result.output
    # ε = 10 diverges; the recommendation is a healthy ε of the row (which one depends on the trained weights)
    assert "recommended: epsilon=0.001 gamma=100" in result.output or "recommended: epsilon=0.0003 gamma=100" in result.output
    assert "recommended: epsilon=10 " not in result.output
    assert "ε=10" in result.output and "diverged" in result.output
    figure = run_copy / "artifacts" / "llc_calibrate" / "step_00000020.png"
    assert f"figure: {figure}" in result.output and figure.stat().st_size > 10_000
    missing = invoke("llc-calibrate", run_copy, "--step", "15")
    assert missing.exit_code == 2 and "no checkpoint at step 15" in missing.output


def test_the_recommendation_is_the_gamma_where_llc_depends_least_on_epsilon_and_the_middle_of_that_row():
    from phaselens.posthoc.llc_calibrate import CalibrationPoint, recommend

    # λ̂ measured by llc-calibrate on the demo's last checkpoint (rows ε, columns γ = 10, 100, 1000)
    grid = {1e-4: (153.5, 144.5, 88.3), 3e-4: (176.3, 148.4, 95.6), 1e-3: (194.7, 150.4, 117.1), 3e-3: (199.8, 156.6, None)}
    points = [CalibrationPoint(eps, gamma, value if value is not None else 682.7, 1.0, [], 50, 3.3,
                               [] if value is not None else ["2 of 4 SGLD chains diverged"])
              for eps, row in grid.items() for gamma, value in zip((10.0, 100.0, 1000.0), row)]
    chosen = recommend(points)
    assert (chosen.epsilon, chosen.gamma) == (1e-3, 100.0)  # not (3e-3, 10): there λ̂ still grows with ε
    assert recommend([p for p in points if p.gamma == 100.0 and p.epsilon == 1e-3]) is None  # one point: no plateau


def test_stages_are_cut_where_the_llc_rests_before_between_and_after_its_rises_and_list_the_transitions_inside():
    import pandas as pd

    from phaselens.analysis.stages import developmental_stages

    steps = np.arange(0, 3100, 100)
    llc = 30 + 90 / (1 + np.exp(-(steps - 1100) / 60)) + 30 / (1 + np.exp(-(steps - 2100) / 60))  # flat, two rises, flat
    llc += 3 * np.clip(steps / 1000, 0, 1)  # a creep of 10% of its level before the first rise: small next to the rises
    transitions = pd.DataFrame([
        {"probe": "loss", "metric": "copy", "layer": None, "head": None, "step": 1132, "start": 1083, "end": 1216,
         "before": 3.87, "after": 1.43, "strength": 35.0},
        {"probe": "heads", "metric": "induction", "layer": 1, "head": 1, "step": 1102, "start": 1049, "end": 1184,
         "before": 0.08, "after": 0.74, "strength": 40.0},
        {"probe": "loss", "metric": "copy", "layer": None, "head": None, "step": 2100, "start": 1915, "end": 2206,
         "before": 1.05, "after": 0.45, "strength": 9.0},
    ])
    stages, points = developmental_stages(pd.Series(llc, index=steps), None, transitions)
    rest_ends, plateau, rest_starts = points["llc"]
    assert 600 <= rest_ends < 1000 and 1400 <= plateau <= 1800 and 2200 < rest_starts <= 2600
    assert [(s.start, s.end) for s in stages] == [(0, rest_ends), (rest_ends, plateau), (plateau, rest_starts), (rest_starts, 3000)]
    assert [s.llc_trend for s in stages] == ["flat", "rising", "rising", "flat"]
    assert stages[0].transitions == [] and stages[3].transitions == []  # the flat stretches claim nothing
    assert stages[1].transitions == ["induction L1H1 ↑ 0.08 → 0.74 at 1102", "copy loss ↓ 3.87 → 1.43 at 1132"]
    assert stages[2].transitions == ["copy loss ↓ 1.05 → 0.45 at 2100"]
    flat, _ = developmental_stages(pd.Series(np.full(len(steps), 50.0), index=steps))
    assert len(flat) == 1 and flat[0].llc_trend == "flat"
    rising, _ = developmental_stages(pd.Series(np.linspace(10.0, 90.0, len(steps)), index=steps))
    assert [(s.start, s.end, s.llc_trend) for s in rising] == [(0, 3000, "rising")]  # no rest, no cut


def test_report_shows_the_llc_curve_stage_table_and_traces_once_the_probe_ran(run_copy):
    from phaselens.posthoc.runner import run_probes
    from phaselens.report import write_report

    options = {"llc": {"chains": 2, "draws": 6, "burnin": 2, "batch_size": 4, "n": 32}}
    assert "Local learning coefficient" not in write_report(run_copy).read_text()
    run_probes(run_copy, ["llc"], options=options, progress=False)
    text = write_report(run_copy).read_text()
    section = text.split("## Local learning coefficient and developmental stages", 1)[1]
    assert "![llc](llc.png)" in section and "![llc_traces](llc_traces.png)" in section
    assert "| stage | steps | λ̂ (smoothed) |" in section and "\n| 1 | 0–" in section
    assert "chains=2" in section
    for figure in ("llc.png", "llc_traces.png"):
        assert (run_copy / "report" / figure).stat().st_size > 10_000


def test_dashboard_serves_the_stages_the_timeline_draws_as_bands(run_copy):
    from fastapi.testclient import TestClient

    from phaselens.posthoc.runner import run_probes
    from phaselens.server import build

    app, _ = build([run_copy])
    with TestClient(app, base_url="http://127.0.0.1:8050") as client:  # loopback: Host must be this machine
        assert client.get(f"/api/runs/{run_copy.name}/stages").json() == {"run": run_copy.name, "stages": []}
        run_probes(run_copy, ["llc"], options={"llc": {"chains": 2, "draws": 6, "burnin": 2, "batch_size": 4, "n": 32}},
                   progress=False)
        stages = client.get(f"/api/runs/{run_copy.name}/stages").json()["stages"]
    assert stages[0]["index"] == 1 and stages[0]["start"] == 0 and stages[-1]["end"] == 20
    assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:]))
    assert {"llc_start", "llc_end", "transitions"} <= set(stages[0])


@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neox", "llama"])
def test_batched_chains_run_on_hugging_face_models_through_the_bridge(tiny_hf_models, architecture):
    from transformer_lens.model_bridge import TransformerBridge

    from phaselens.probes.llc import masked_token_loss

    bridge = TransformerBridge.boot_transformers(str(tiny_hf_models[architecture]), device="cpu")
    bridge.eval()
    tokens = torch.randint(2, 96, (16, 24), generator=torch.Generator().manual_seed(0))
    sample = {"tokens": tokens, "loss_mask": torch.ones(16, 23, dtype=torch.bool)}
    options = SGLDOptions(chains=2, draws=4, burnin=2, batch_size=4, n=16)
    batched = LLCEstimator(bridge, masked_token_loss, sample, options).estimate()
    one_by_one = LLCEstimator(bridge, masked_token_loss, sample, options).estimate(batched=False)
    assert batched.batched, batched.warnings
    assert np.isfinite(batched.traces).all() and batched.init_loss > 0
    np.testing.assert_allclose(batched.traces, one_by_one.traces, rtol=1e-3, atol=1e-4)
