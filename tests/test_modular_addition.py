"""The modular-addition task, full-batch training with accuracies, and the grokking probe on real (tiny) models."""

from __future__ import annotations

import math

import pytest
import torch

import phaselens as pl
from phaselens.errors import ConfigError
from phaselens.probes.base import make_probe
from phaselens.probes.grokking import excluded_logits, fourier_norms, grid_tokens, modular_sum_loss
from phaselens.probes.loss import prediction_accuracy
from phaselens.probes.measure import measure_model
from phaselens.tasks.modular_addition import ModularAdditionTask
from phaselens.training.config import load_config

TINY = ["data.p=11", "model.d_vocab=12", "model.d_model=32", "model.d_head=8", "model.d_mlp=64", "train.steps=6",
        "train.checkpoint_every=3", "train.eval_every=2", "telemetry.every=2"]


def test_the_split_is_a_seeded_share_of_all_pairs_and_batches_are_a_b_equals_c():
    task = ModularAdditionTask(p=13, train_fraction=0.3, seed=0)
    train, held = task.sample(0, torch.Generator(), "train"), task.sample(0, torch.Generator(), "eval")
    assert len(train) == round(0.3 * 169) and len(train) + len(held) == 169
    pairs = lambda batch: {tuple(r) for r in batch.tokens[:, :2].tolist()}  # noqa: E731
    assert not pairs(train) & pairs(held)
    for batch in (train, held):
        a, b, eq, c = batch.tokens.unbind(-1)
        assert (eq == 13).all() and torch.equal(c, (a + b) % 13)
        assert batch.positions["answer"].tolist() == [[False, False, True]] * len(batch)
        assert torch.equal(batch.loss_mask, batch.positions["answer"])
    assert train.positions["train_pairs"].any(-1).all() and not held.positions["train_pairs"].any()
    assert pairs(ModularAdditionTask(13, 0.3, seed=0).sample(0, torch.Generator(), "train")) == pairs(train)
    assert pairs(ModularAdditionTask(13, 0.3, seed=1).sample(0, torch.Generator(), "train")) != pairs(train)
    grid = task.sample(0, torch.Generator(), "probe")  # every pair, the training ones marked
    assert torch.equal(grid.tokens[:, :3], grid_tokens(13)) and int(grid.positions["train_pairs"].sum()) == len(train)
    drawn = task.sample(50, torch.Generator().manual_seed(0), "eval")
    assert len(drawn) == 50 and pairs(drawn) <= pairs(held)


@pytest.mark.parametrize("override, message", [
    ("data.p=12", "data.p must be an odd number"),
    ("data.train_fraction=1.0", "data.train_fraction must be in"),
    ("data.train_fraction=0.00001", "leaves no training pair"),
    ("model.d_vocab=100", "model.d_vocab=100: modular addition over p=113 needs d_vocab >= 114"),
    ("model.n_ctx=3", "model.n_ctx=3"),
    ("data.eval_size=-1", "data.eval_size must be >= 0"),
])
def test_impossible_modular_addition_options_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("grokking", [override])


def test_full_batch_needs_a_task_with_a_fixed_training_set():
    with pytest.raises(ConfigError, match="0 \\(full batch\\) needs a task with a fixed training set"):
        load_config("induction", ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="data.eval_size must be >= 1"):
        load_config("induction", ["data.eval_size=0"])


def test_the_grokking_preset_is_nanda_et_als_setup():
    config = load_config("grokking")
    m, t = config.model, config.train
    assert (m.n_layers, m.n_heads, m.d_model, m.d_mlp, m.act_fn, m.normalization) == (1, 4, 128, 512, "relu", "none")
    assert (config.data.p, config.data.train_fraction) == (113, 0.3)
    assert (t.lr, t.weight_decay, t.beta1, t.beta2, t.batch_size) == (1e-3, 1.0, 0.9, 0.98, 0)


def test_prediction_accuracy_counts_argmax_hits_in_the_mask():
    logits = torch.zeros(2, 3, 5)
    logits[0, 1, 4] = logits[1, 1, 2] = 1.0  # row 0 predicts 4 after position 1, row 1 predicts 2
    tokens = torch.tensor([[0, 0, 4], [0, 0, 3]])
    mask = torch.tensor([[False, True], [False, True]])
    assert float(prediction_accuracy(logits, tokens, mask)) == 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """grokking_small shrunk to p = 11 and 6 steps: full batch, accuracies and progress measures every 2 steps."""
    path = tmp_path_factory.mktemp("modular") / "run"
    pl.train(load_config("grokking_small", TINY), path, progress=False)
    return path


def test_full_batch_training_logs_train_and_test_accuracy(tiny_run):
    config = load_config("grokking_small", TINY)
    run = pl.open_run(tiny_run)
    acc = run.metrics(probe="loss")
    assert sorted(acc[acc["metric"] == "train_acc"]["step"]) == [0, 2, 4]
    assert sorted(acc[acc["metric"] == "eval_acc"]["step"]) == [0, 2, 4, 6]
    assert acc[acc["metric"].isin(["train_acc", "eval_acc"])]["value"].between(0, 1).all()
    # full batch: the train loss at step 0 is the loss over every training pair of the initial model
    model = run.load_model(step=0)
    task = config.build_task()
    train = task.sample(0, torch.Generator(), "train")
    with torch.no_grad():
        logits = model(train.tokens)[:, 2]
    expected = torch.nn.functional.cross_entropy(logits, train.tokens[:, 3])
    logged = acc[(acc["metric"] == "train") & (acc["step"] == 0)]["value"].item()
    assert logged == pytest.approx(float(expected), rel=1e-4)
    artifacts = sorted(p.name for p in (tiny_run / "artifacts" / "grokking").iterdir())
    assert artifacts == ["step_00000000.json", "step_00000003.json", "step_00000006.json"]


def test_the_dashboard_timeline_lists_the_progress_measures_like_any_metric(tiny_run):
    from fastapi.testclient import TestClient

    from phaselens.server import build

    app, _ = build([tiny_run])
    with TestClient(app, base_url="http://127.0.0.1:8050") as client:  # loopback: Host must be this machine
        listed = {(s["probe"], s["metric"]) for s in client.get(f"/api/runs/{tiny_run.name}/series").json()["series"]}
        rows = client.get(f"/api/runs/{tiny_run.name}/metrics",
                          params={"probe": "grokking", "metric": "restricted_loss", "source": "live"}).json()
    assert {("grokking", m) for m in ("restricted_loss", "excluded_loss", "weight_norm", "fourier_gini",
                                       "key_frequency_share")} | {("loss", "train_acc"), ("loss", "eval_acc")} <= listed
    assert rows["step"] == [0, 2, 4]


@pytest.fixture(scope="module")
def tiny_model_and_task():
    config = load_config("grokking_small", TINY)
    torch.manual_seed(0)
    return pl.build_model(config.model), config.build_task()


def test_the_grokking_probe_gives_the_same_values_live_and_on_the_probe_grid(tiny_model_and_task):
    model, task = tiny_model_and_task
    probe = make_probe("grokking")
    grid = task.sample(0, torch.Generator(), "probe")  # the measured forward is the whole grid
    train = task.sample(0, torch.Generator(), "train")  # live: the probe runs the grid itself
    on_grid = dict((m.metric, float(m.value)) for m in measure_model(model, grid, [probe])[0][1])
    on_train = dict((m.metric, float(m.value)) for m in measure_model(model, train, [probe])[0][1])
    assert on_grid.keys() == {"restricted_loss", "excluded_loss", "weight_norm", "fourier_gini", "key_frequency_share"}
    for metric, value in on_grid.items():
        assert on_train[metric] == pytest.approx(value, rel=1e-5), metric


def test_excluded_loss_without_key_frequencies_is_the_training_pairs_loss(tiny_model_and_task):
    model, task = tiny_model_and_task
    grid = task.sample(0, torch.Generator(), "probe")
    fixed = make_probe("grokking", key_frequencies=[])
    values = dict((m.metric, float(m.value)) for m in measure_model(model, grid, [fixed])[0][1])
    train = task.sample(0, torch.Generator(), "train")
    with torch.no_grad():
        train_loss = torch.nn.functional.cross_entropy(model(train.tokens)[:, 2], train.tokens[:, 3])
    assert values["excluded_loss"] == pytest.approx(float(train_loss), rel=1e-4)
    assert values["key_frequency_share"] == 0.0
    # the restricted logits keep only the constant term: the same logit for every pair, ln V at best
    assert values["restricted_loss"] >= math.log(12) - 0.05


def test_fixed_key_frequencies_remove_exactly_their_terms(tiny_model_and_task):
    model, task = tiny_model_and_task
    grid = task.sample(0, torch.Generator(), "probe")
    probe = make_probe("grokking", key_frequencies=[1, 3])
    values = dict((m.metric, float(m.value)) for m in measure_model(model, grid, [probe])[0][1])
    with torch.no_grad():
        logits = model(grid_tokens(11))[:, 2].view(11, 11, -1)
    pairs = grid.positions["train_pairs"].any(-1).view(11, 11)
    expected = modular_sum_loss(excluded_logits(logits, torch.tensor([1, 3])), pairs)
    assert values["excluded_loss"] == pytest.approx(float(expected), rel=1e-5)
    norms = fourier_norms(model.W_E[:11].detach())
    assert values["key_frequency_share"] == pytest.approx(float((norms[[0, 2]] ** 2).sum() / (norms ** 2).sum()), rel=1e-5)


def test_the_grokking_probe_refuses_another_tasks_batch(tiny_model_and_task, induction_run):
    run = pl.open_run(induction_run)
    with pytest.raises(ValueError, match="answer"):
        measure_model(run.load_model(step=0), run.probe_batch(), [make_probe("grokking")])


def test_unknown_grokking_options_are_refused():
    with pytest.raises(TypeError):
        make_probe("grokking", keys=[1])
    with pytest.raises(ValueError, match="key_ratio must be > 1"):
        make_probe("grokking", key_ratio=0.5)


def test_compare_reports_the_grokking_headline_on_the_declared_axes(tiny_run, tmp_path):
    from phaselens.sweeps.compare import compare_runs

    comparison = compare_runs([tiny_run], tmp_path / "compare")
    row = comparison.table.iloc[0]
    assert row["lr·wd"] == pytest.approx(3e-3 * 2.0) and row["train_fraction"] == 0.4
    assert row["tau"] is None or math.isnan(row["tau"])  # six steps: test accuracy never reached 0.95


def test_the_grokking_demo_refuses_the_induction_only_layers_option():
    from typer.testing import CliRunner

    from phaselens.cli import app

    result = CliRunner().invoke(app, ["demo", "--study", "grokking", "--layers", "1"])
    assert result.exit_code == 2 and "--layers applies to the induction demo" in result.output
