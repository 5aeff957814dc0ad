"""Sparse-neuron analysis: formulas against a direct computation, the neurons command, probe and report."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from phaselens.analysis.neurons import TokenStream, neurons_report, scan_neurons
from phaselens.models import ModelConfig, build_model
from phaselens.models.bdh_config import BDHConfig
from phaselens.probes.neurons import NeuronStats

TINY_BDH = ["model.n_layers=2", "model.d_model=16", "model.n_heads=2", "model.multiplier=4", "model.n_ctx=32",
            "train.steps=20", "train.batch_size=8", "train.checkpoint_every=10", "train.eval_every=10", "train.threads=1",
            "telemetry.every=5", "data.probe_size=8", "data.eval_size=8"]


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory) -> Path:
    """A small text in the corpus's speaker format (about 12 kB)."""
    lines = []
    for i in range(120):
        speaker = ("ROMEO", "JULIET", "Nurse")[i % 3]
        lines.append(f"{speaker}:\nWhat light through yonder window breaks, {i}?\nIt is the east.\n\n")
    path = tmp_path_factory.mktemp("text") / "dialogue.txt"
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def bdh_run(tmp_path_factory, dialogue) -> Path:
    """A tiny BDH trained 20 steps on `dialogue`, the neurons probe at checkpoints 0, 10, 20."""
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    config = load_config("bdh_shakespeare_small", TINY_BDH + ["data.corpus=", f"data.path={dialogue}"])
    path = tmp_path_factory.mktemp("bdh") / "run"
    train(config, path, progress=False)
    return path


def direct_statistics(model, hook: str, windows: torch.Tensor):
    """Firing rate, max/mean selectivity and top-5 per neuron from one cached forward over all windows."""
    _, cache = model.run_with_cache(windows, names_filter=[hook])
    act = cache[hook]
    rows = act.transpose(1, 2).reshape(-1, act.shape[1] * act.shape[3]) if act.dim() == 4 else act.reshape(-1, act.shape[-1])
    rate = (rows > 0).double().mean(0)
    mean = rows.double().mean(0)
    selectivity = torch.where(rate > 0, rows.double().max(0).values / mean, torch.tensor(float("nan"), dtype=torch.float64))
    return rate, selectivity, rows.topk(5, dim=0)


@pytest.mark.parametrize("kind", ["bdh", "transformer"])
def test_firing_rate_and_selectivity_equal_a_direct_computation(kind):
    torch.manual_seed(0)
    if kind == "bdh":
        model, hook = build_model(BDHConfig(n_layers=2, d_model=16, n_heads=2, multiplier=4, n_ctx=16, dropout=0.0)), "blocks.1.hook_xy_sparse"
    else:
        model, hook = build_model(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=48, d_vocab=256, n_ctx=16, act_fn="relu")), "blocks.1.mlp.hook_post"
    model.eval()
    stream = TokenStream(torch.randint(0, 256, (16 * 11,), generator=torch.Generator().manual_seed(1)))
    # three sequences per chunk: the statistics are merged over four chunks, the last one short
    scan = scan_neurons(model, stream, n_tokens=16 * 11, top_k=5, progress=False, rows=3)
    stats = scan.stats[1]
    rate, selectivity, (top_values, top_rows) = direct_statistics(model, hook, stream.tokens.view(11, 16))
    assert scan.tokens == 176 and 0 < float(rate.mean()) < 1
    assert torch.allclose(stats.firing_rate(), rate)
    assert torch.allclose(stats.selectivity(), selectivity, equal_nan=True, rtol=1e-5)
    fired = top_values > 0  # top-k keeps firing values only
    assert torch.allclose(stats.top_values[fired], top_values[fired])
    assert torch.equal(stats.top_positions[fired], top_rows[fired])
    summary = stats.summary()
    assert math.isclose(float(summary["frac_rare"]), float((rate < 0.01).double().mean()))
    assert math.isclose(float(summary["frac_dead"]), float((rate == 0).double().mean()))
    firing = selectivity[rate > 0]
    assert math.isclose(float(summary["selectivity_median"]), float(firing.median()), rel_tol=1e-6)


def test_statistics_take_the_same_memory_for_any_number_of_tokens():
    small, large = NeuronStats(64, top_k=5), NeuronStats(64, top_k=5)
    for _ in range(2):
        small.update(torch.relu(torch.randn(4, 16, 64)))
    for _ in range(40):
        large.update(torch.relu(torch.randn(4, 16, 64)))
    size = lambda s: sum(t.numel() * t.element_size() for t in (s.count, s.total, s.max, s.top_values, s.top_positions, s._fired))
    assert large.tokens == 20 * small.tokens and size(large) == size(small)


def test_neurons_command_on_a_bdh_run_reports_sparsity_and_readable_contexts(bdh_run, dialogue):
    from phaselens.cli import app

    result = CliRunner().invoke(app, ["neurons", str(bdh_run), "--tokens", "1500", "--top-k", "4", "--window", "12"])
    assert result.exit_code == 0, result.output
    assert "layer 0 (blocks.0.hook_xy_sparse, 64 neurons): mean firing rate" in result.output
    report = (bdh_run / "report" / "neurons" / "neurons.md").read_text()
    assert "| layer | neurons | mean firing rate |" in report and "rare (<1%)" in report
    assert (bdh_run / "report" / "neurons" / "neurons.png").stat().st_size > 1000
    data = json.loads((bdh_run / "artifacts" / "neurons" / "step_00000020.json").read_text())
    assert data["format"] == "phaselens.neurons/1" and data["step"] == 20
    held_out = math.ceil(len(dialogue.read_bytes()) * 0.1)  # fewer than the 1,500 asked for: all of it, in full windows
    assert data["tokens"] == len(data["stream"]["tokens"]) == held_out // 32 * 32
    layer = data["layers"][0]
    assert layer["hook"] == "blocks.0.hook_xy_sparse" and len(layer["firing_rate"]) == 64 == layer["n_neurons"]
    assert len(layer["top_positions"]) == 4 and len(layer["top_positions"][0]) == 64
    contexts = [c for item in layer["most_selective"] for c in item["contexts"]]
    assert contexts and all(len(c["token"]) == 1 for c in contexts)
    # a context is the held-out text around the stored position
    text = bytes(data["stream"]["tokens"]).decode()
    first = contexts[0]
    assert text[first["position"] - 12:first["position"] + 1] == first["before"] + first["token"]
    assert "↵" in report  # newlines in contexts are made visible


def test_text_report_works_without_matplotlib(bdh_run, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = neurons_report(bdh_run, n_tokens=600, out=tmp_path / "plain", progress=False)
    assert result.figure is None and not (tmp_path / "plain" / "neurons.png").exists()
    text = result.report.read_text()
    assert "matplotlib is not installed" in text and "mean firing rate" in text


def test_a_second_scan_of_a_step_on_another_hook_says_which_scan_it_replaced(bdh_run, tmp_path):
    """The BDH page scans the last checkpoint on xy_sparse, then on x_sparse: the second replaced the first silently."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bdh_run, run, ignore=shutil.ignore_patterns("neurons"))  # no scan of another test's
    first = neurons_report(run, n_tokens=500, progress=False)
    assert not [line for line in first.lines if line.startswith("replaced")]
    second = neurons_report(run, hook="x_sparse", n_tokens=500, progress=False)
    (said,) = [line for line in second.lines if line.startswith("replaced")]
    assert "xy_sparse" in said.split(" with this one")[0] and "x_sparse" in said.split(" with this one")[1], said
    again = neurons_report(run, hook="x_sparse", n_tokens=500, progress=False)  # the same settings: nothing to say
    assert not [line for line in again.lines if line.startswith("replaced")]


def test_neurons_probe_is_logged_at_every_checkpoint_and_reported_against_step(bdh_run):
    import phaselens as pl
    from phaselens.report import write_report

    run = pl.open_run(bdh_run)
    rows = run.metrics(probe="neurons")
    assert set(rows["source"]) == {"checkpoint"} and sorted(rows["step"].unique()) == [0, 10, 20]
    assert set(rows["metric"]) == {"firing_rate_mean", "frac_rare", "frac_dead", "selectivity_median"}
    assert sorted(rows["layer"].unique()) == [0, 1]
    rate = rows[rows["metric"] == "firing_rate_mean"]["value"]
    assert ((rate > 0) & (rate < 1)).all()
    report = write_report(bdh_run).read_text()
    assert "## Sparse neurons over training" in report and "neuron_sparsity.png" in report
    assert "byte-unigram entropy" in report
    assert (bdh_run / "report" / "neuron_sparsity.png").is_file()


def test_neurons_on_a_bdh_checkpoint_file_and_on_transformer_mlp_neurons(bdh_run, dialogue, tmp_path):
    import phaselens as pl

    model = pl.open_run(bdh_run).load_model()
    config = {"n_layer": 2, "n_embd": 16, "n_head": 2, "mlp_internal_dim_multiplier": 4, "vocab_size": 256, "block_size": 32}
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()}, "config": config}, tmp_path / "bdh.pt")
    result = neurons_report(tmp_path / "bdh.pt", n_tokens=500, text=str(dialogue), progress=False)
    assert result.report == tmp_path / "bdh_neurons" / "neurons.md"
    assert json.loads(result.artifact.read_text())["layers"][1]["hook"] == "blocks.1.hook_xy_sparse"

    torch.manual_seed(0)
    gpt = build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=256, n_ctx=32))
    stream = TokenStream(torch.tensor(list(dialogue.read_bytes()[:640])))
    scan = scan_neurons(gpt, stream, n_tokens=640, progress=False)
    assert scan.hooks == [(0, "blocks.0.mlp.hook_post")] and scan.stats[0].count.numel() == 32
    scan = scan_neurons(model, stream, hook="x_sparse", n_tokens=64, progress=False)
    assert [name for _, name in scan.hooks] == ["blocks.0.hook_x_sparse", "blocks.1.hook_x_sparse"]


def test_mlp_neurons_of_a_hugging_face_model_equal_a_direct_computation(tiny_hf_models):
    """The scan reads the model through its adapter: a TransformerBridge's context, device and hook points."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(tiny_hf_models["gpt_neox"]), device="cpu")
    bridge.eval()
    n_ctx = bridge.cfg.n_ctx  # 64
    stream = TokenStream(torch.randint(0, 96, (n_ctx * 5,), generator=torch.Generator().manual_seed(2)), kind="ids")
    scan = scan_neurons(bridge, stream, n_tokens=n_ctx * 5, top_k=3, progress=False, rows=2)
    assert [name for _, name in scan.hooks] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    rate, selectivity, _ = direct_statistics(bridge, "blocks.1.mlp.hook_post", stream.tokens.view(5, n_ctx))
    assert scan.tokens == n_ctx * 5 and scan.stats[1].count.numel() == 64
    assert torch.allclose(scan.stats[1].firing_rate(), rate)
    assert torch.allclose(scan.stats[1].selectivity(), selectivity, equal_nan=True, rtol=1e-4)
