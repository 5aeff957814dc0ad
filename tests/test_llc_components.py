"""The weight- and data-refined LLC (`llc` option `components`, `positions`), its standard error, the basin
diagnostic, and heads clustered by the shape of their rLLC curves."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from phaselens.models.adapter import ComponentParameters
from phaselens.probes.llc import LLCEstimator, SGLDOptions, chain_warnings
from test_llc import half_mse, one_thread  # noqa: F401  (one_thread: the autouse fixture, used here too)


def regression(d: int, n: int, scale: float = 1.0):
    """A linear model at its least-squares fit on n Gaussian samples; the last input divided by `scale` and its
    weight multiplied by it (the same function, with that weight's coordinate stretched)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
        x[:, -1] /= scale
        model.weight[0, -1] *= scale
    return model, {"x": x, "y": y}


def first(d: int, k: int) -> ComponentParameters:
    mask = torch.zeros(1, d, dtype=torch.bool)
    mask[0, :k] = True
    return ComponentParameters(f"first{k}", "heads", 0, 0, {"weight": mask})


def test_restricted_llc_of_linear_regression_is_half_the_restricted_dimension():
    d, n = 10, 2000
    model, sample = regression(d, n)
    options = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=8, draws=600, burnin=200, batch_size=500, n=n)
    whole, four = LLCEstimator(model, half_mse, sample, options).estimate_components([None, first(d, 4)])
    assert whole.llc == pytest.approx(d / 2, rel=0.15) and whole.size == d
    assert four.llc == pytest.approx(4 / 2, rel=0.15) and four.size == 4 and four.component == "first4"
    assert 0 < four.llc_se < four.llc / 5 and four.warnings == []


def test_restricted_llc_does_not_depend_on_a_frozen_coordinate():
    d, n = 4, 500
    options = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=3, draws=60, burnin=20, batch_size=100, n=n)
    found = {}
    for scale in (1.0, 30.0):  # the frozen last weight stretched 30×: the function is the same
        model, sample = regression(d, n, scale)
        found[scale] = LLCEstimator(model, half_mse, sample, options).estimate_components([None, first(d, 3)])
    assert found[1.0][1].llc == pytest.approx(found[30.0][1].llc, rel=1e-3)
    np.testing.assert_allclose(found[1.0][1].traces, found[30.0][1].traces, rtol=1e-4)
    assert found[1.0][0].llc != pytest.approx(found[30.0][0].llc, rel=1e-2)  # the unrestricted chains do see it


def test_components_batched_together_run_the_chains_each_runs_alone():
    d, n = 6, 400
    model, sample = regression(d, n)
    options = SGLDOptions(epsilon=1e-4, gamma=1.0, chains=2, draws=20, burnin=5, batch_size=50, n=n, seed=5)
    parts = [None, first(d, 2), first(d, 5)]
    together = LLCEstimator(model, half_mse, sample, options).estimate_components(parts)
    for part, joint in zip(parts, together):
        alone = LLCEstimator(model, half_mse, sample, options).estimate_components([part])[0]
        np.testing.assert_allclose(joint.traces, alone.traces, rtol=1e-5)
    one_by_one = LLCEstimator(model, half_mse, sample, options).estimate_components(parts, batched=False)
    np.testing.assert_allclose(np.stack([r.traces for r in one_by_one]), np.stack([r.traces for r in together]), rtol=1e-4)
    whole = LLCEstimator(model, half_mse, sample, options).estimate()  # components=model is the plain estimate
    np.testing.assert_array_equal(whole.traces, together[0].traces)


def test_the_basin_warning_fires_when_the_chains_sit_above_the_uniform_guess():
    uniform = math.log(64)  # 4.16
    healthy = np.full((2, 40), 3.5) + np.linspace(0, 0.01, 40)  # w* at 3.3, chains 0.2 above it
    left = np.full((2, 40), 4.3)
    assert not any("left the basin" in w for w in chain_warnings(healthy, 10, 3.3, np.array([30.0, 30.0]), uniform))
    fired = chain_warnings(left, 10, 3.3, np.array([150.0, 150.0]), uniform)
    assert any("left the basin" in w and "4.3" in w for w in fired)
    assert not any("left the basin" in w for w in chain_warnings(left, 10, 3.3, np.array([150.0, 150.0])))  # no vocab
    near_start = chain_warnings(np.full((2, 40), 4.2), 10, 4.15, np.array([5.0, 5.0]), uniform)  # w* at the uniform guess
    assert not any("left the basin" in w for w in near_start)


def test_adapters_name_each_head_mlp_layer_and_the_embeddings():
    from phaselens.models.adapter import adapter_for
    from phaselens.models.bdh import BDH
    from phaselens.models.bdh_config import BDHConfig
    from phaselens.models.config import ModelConfig
    from phaselens.models.transformer import Transformer

    model = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, d_vocab=20, n_ctx=12))
    parts = {c.name: c for c in adapter_for(model).component_parameters()}
    assert list(parts) == ["L0H0", "L0H1", "L1H0", "L1H1", "L0 MLP", "L1 MLP", "L0", "L1", "embed", "unembed"]
    head = parts["L1H0"]
    assert head.size == 4 * 16 * 8 + 3 * 8 and head.masks["blocks.1.attn.W_Q"][0].all()
    assert not head.masks["blocks.1.attn.W_Q"][1].any()
    assert parts["L0 MLP"].size == 16 * 32 + 32 + 32 * 16 + 16
    covered = sum(c.size for n, c in parts.items() if n in ("L0", "L1", "embed", "unembed"))
    assert covered == sum(p.numel() for p in model.parameters())  # layers and embeddings tile the model

    bdh = BDH(BDHConfig(n_layers=2, n_heads=2, d_model=16, multiplier=1, d_vocab=256, n_ctx=12))  # N = 8
    heads = [c for c in adapter_for(bdh).component_parameters() if c.kind == "heads"]
    assert [c.name for c in heads] == ["H0", "H1"] and all(c.layer == 0 for c in heads)
    assert heads[0].size == 3 * 16 * 8 and not (heads[0].masks["decoder"] & heads[1].masks["decoder"]).any()


def test_bridge_heads_select_the_weights_the_bridge_reads_as_that_heads_w_q(tiny_hf_models):
    from transformer_lens.model_bridge import TransformerBridge

    from phaselens.models.adapter import adapter_for

    bridge = TransformerBridge.boot_transformers(str(tiny_hf_models["llama"]), device="cpu")
    adapter = adapter_for(bridge)
    parts = adapter.component_parameters()
    params = dict(bridge.named_parameters())
    head = next(c for c in parts if c.name == "L1H2")
    q = next(name for name in head.masks if "q_proj" in name)
    np.testing.assert_array_equal(np.sort(params[q].detach()[head.masks[q]].numpy()),
                                  np.sort(adapter.head_weights().W_Q[1, 2].detach().reshape(-1).numpy()))
    k = next(name for name in head.masks if "k_proj" in name)
    partner = next(c for c in parts if c.name == "L1H3")  # grouped-query: heads 2 and 3 share keys
    assert torch.equal(head.masks[k], partner.masks[k]) and "shared" in head.note


def test_llc_probe_measures_heads_layers_and_positions_and_refuses_an_unknown_set(run_copy):
    from phaselens.errors import ConfigError
    from phaselens.posthoc.runner import run_probes
    from phaselens.run import open_run

    options = {"llc": {"chains": 2, "draws": 4, "burnin": 2, "batch_size": 4, "n": 32, "components": "model,heads,layers",
                       "positions": "copy"}}
    result = run_probes(run_copy, ["llc"], steps=[20], options=options, progress=False)
    assert result.ok
    rows = open_run(run_copy).metrics(probe="llc")
    heads = rows[(rows["metric"] == "llc") & rows["head"].notna()]
    assert sorted(zip(heads["layer"], heads["head"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert set(rows["metric"]) == {"llc", "llc_se", "llc_std", "llc_layer", "llc_layer_se"}
    for metric in ("llc", "llc_layer"):  # every llc row has its standard error
        keyed = lambda m: set(zip(rows[rows["metric"] == m]["layer"].fillna(-1), rows[rows["metric"] == m]["head"].fillna(-1)))
        assert keyed(metric) == keyed(f"{metric}_se")
    artifact = json.loads((run_copy / "artifacts" / "llc" / "step_00000020.json").read_text())
    assert artifact["positions"] == "copy" and len(artifact["components"]) == 6
    assert {c["component"] for c in artifact["components"]} == {"L0H0", "L0H1", "L1H0", "L1H1", "L0", "L1"}
    from fastapi.testclient import TestClient

    from phaselens.server import build

    app, _ = build([run_copy])
    with TestClient(app, base_url="http://127.0.0.1:8050") as client:  # what the head panel plots beside the head scores
        served = client.get(f"/api/runs/{run_copy.name}/metrics", params={"probe": "llc", "metric": "llc", "prefer": "densest"}).json()
    assert sorted((l, h) for l, h in zip(served["layer"], served["head"]) if h is not None) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ConfigError, match="position set 'kopy'"):
        open_run(run_copy).plan(["llc"], {"llc": {"positions": "kopy"}}).require()
    with pytest.raises(ConfigError, match="components=.*heds"):
        open_run(run_copy).plan(["llc"], {"llc": {"components": "heds"}}).require()


def test_seed_per_step_gives_each_checkpoint_its_own_chains(run_copy):
    from phaselens.run import open_run
    from phaselens.run_files import ensure_run_files

    run = open_run(run_copy)
    seeds = {}
    for independent in (False, True):
        plan = run.plan(["llc"], {"llc": {"chains": 2, "draws": 2, "burnin": 1, "n": 32, "seed_per_step": independent}})
        ensure_run_files(run, plan.require())
        probe = plan.probes[0].make()
        probe.bind_run(run_copy)
        seeds[independent] = [probe.estimator(run.load_model(step)).seed for step in (10, 20)]
    assert seeds[False] == [0, 0] and len(set(seeds[True])) == 2


def synthetic_curves() -> pd.DataFrame:
    """Two heads that rise at step 1,000 and stay, two that rise then fall back, one flat-then-late riser."""
    steps = np.arange(0, 3100, 100)
    rise = 1 / (1 + np.exp(-(steps - 1000) / 80))
    bump = np.exp(-((steps - 1200) / 300) ** 2)
    late = 1 / (1 + np.exp(-(steps - 2500) / 80))
    noise = np.random.default_rng(0).normal(0, 0.01, (5, len(steps)))
    return pd.DataFrame({"L0H0": 40 * rise + noise[0], "L0H1": 30 * rise + 2 + noise[1], "L1H0": 14 * bump + noise[2],
                         "L1H1": 16 * bump + 1 + noise[3], "L1H2": 9 * late + noise[4]}, index=steps)


def test_heads_with_differently_shaped_curves_fall_in_different_clusters():
    from phaselens.analysis.head_clusters import average_linkage, cluster_heads

    clusters = cluster_heads(synthetic_curves(), {"L1H0": "induction", "L1H1": "induction", "L0H1": "prev_token"})
    groups = clusters.groups()
    assert clusters.k == 3 and clusters.silhouette > 0.5
    assert sorted(map(sorted, groups)) == [["L0H0", "L0H1"], ["L1H0", "L1H1"], ["L1H2"]]  # the level does not count
    merges = average_linkage(clusters.curves)
    assert len(merges) == 4 and merges[-1][3] == 5 and all(a[2] <= b[2] for a, b in zip(merges, merges[1:]))
    same = cluster_heads(pd.DataFrame({h: synthetic_curves()["L0H0"] * (i + 1) for i, h in enumerate("abcd")}))
    assert same.k == 1  # one shape: one cluster


@pytest.mark.slow
def test_per_head_rllc_on_the_demo_rises_in_the_induction_heads_at_the_copy_loss_drop(induced_run, tmp_path):
    """Four checkpoints around and after the first copy-loss drop (1,083–1,216 on the reference run), small chains."""
    from phaselens.posthoc.runner import run_probes
    from phaselens.report import write_report
    from phaselens.run import open_run

    run = tmp_path / "demo"
    shutil.copytree(induced_run, run, ignore=shutil.ignore_patterns("report"))
    steps = [1000, 1300, 2000, 3000]
    options = {"llc": {"components": "model,heads", "chains": 2, "draws": 20, "burnin": 20, "n": 256}}
    assert run_probes(run, ["llc"], steps=steps, options=options, progress=False).ok
    rows = open_run(run).metrics(probe="llc")
    heads = rows[(rows["metric"] == "llc") & rows["head"].notna()]
    assert heads.groupby("step").size().to_dict() == {s: 4 for s in steps}  # all 4 heads at every checkpoint
    assert rows[rows["metric"] == "llc_se"].groupby("step").size().to_dict() == {s: 5 for s in steps}
    for head in (0, 1):  # the layer-1 induction heads: several times higher after the drop than before it
        curve = heads[(heads["layer"] == 1) & (heads["head"] == head)].set_index("step")["value"]
        assert curve[1300] > 3 * curve[1000] > 0
    section = write_report(run).read_text().split("### Heads", 1)[1]
    assert "![llc_heads](llc_heads.png)" in section and "![llc_dendrogram](llc_dendrogram.png)" in section
    assert "cluster 2:" in section  # the heads do not all fall in one cluster


@pytest.mark.slow  # the demo run (3,000 trained steps); the llc probe at its defaults on two checkpoints: ~10 s
def test_at_the_defaults_the_chains_stay_in_the_basin_after_the_copy_loss_drop(induced_run, tmp_path):
    """The reference run: once the model beats the uniform guess clearly (after the copy-loss drop), the default ε and
    γ keep the chains' mean loss under it, so the demo's LLC curve is measured without "chains left the basin"
    (at the former defaults, ε = 1e-3 and γ = 100, every checkpoint from 1,200 on warned)."""
    from phaselens.posthoc.runner import run_probes
    from phaselens.run import open_run

    run = tmp_path / "demo"
    shutil.copytree(induced_run, run, ignore=shutil.ignore_patterns("report"))
    assert run_probes(run, ["llc"], steps=[1500, 3000], progress=False).ok
    for step in (1500, 3000):
        artifact = json.loads((run / "artifacts" / "llc" / f"step_{step:08d}.json").read_text())
        assert artifact["options"]["gamma"] == 1000 and artifact["options"]["epsilon"] == 3e-4
        assert not [w for w in artifact["warnings"] if "left the basin" in w], (step, artifact["warnings"])
        assert artifact["init_loss"] < 0.95 * math.log(64)  # the check applies here: w* beats the uniform guess by 5%
    assert (open_run(run).metrics(probe="llc", metric="llc")["value"] > 0).all()


DOC = Path(__file__).parent.parent / "docs" / "tutorials" / "components.md"
MARKER = "<!-- run by tests/test_llc_components.py -->"


def doc_blocks(language: str) -> list[str]:
    """The page's code blocks of `language` that carry this file's marker."""
    parts = DOC.read_text().split(MARKER)[1:]
    return [part.split(f"```{language}\n", 1)[1].split("```", 1)[0] for part in parts if part.lstrip().startswith(f"```{language}")]


def test_the_components_page_runs_as_written(run_copy, capsys):
    """Its commands on a run (small chains added), then its Python on what they measured."""
    from typer.testing import CliRunner

    from phaselens.cli import app

    (commands,) = doc_blocks("bash")
    small = ["--probe-option", "llc.chains=2", "--probe-option", "llc.draws=3", "--probe-option", "llc.burnin=1",
             "--probe-option", "llc.n=32"]
    for line in commands.strip().splitlines():
        args = line.split()[1:]
        assert args[1] == "runs/demo", line
        args[1] = str(run_copy)
        result = CliRunner().invoke(app, args + (small if args[0] == "probe" else []))
        assert result.exit_code == 0, result.output
    assert "### Heads" in (run_copy / "report" / "report.md").read_text()
    (code,) = doc_blocks("python")
    exec(code.replace("runs/demo", str(run_copy)), {})
    printed = capsys.readouterr().out
    assert "L1H0" in printed  # three checkpoints of four heads: clusters to print
