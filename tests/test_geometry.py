"""The geometry probe: interaction energy and KL to the unigram, live and on checkpoints, and its phases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import phaselens as pl
from phaselens.analysis.phases import critical_points, geometry_phases
from phaselens.probes.geometry import GeometryProbe, interaction_energy, kl_to_unigram, unigram_log_probs
from phaselens.probes.measure import measure_model
from phaselens.tasks.batch import TaskBatch


def numpy_interaction_energy(x: np.ndarray, beta: float) -> float:
    """The definition, sequence by sequence and pair by pair: x (B, T, d)."""
    per_sequence = []
    for seq in x:
        n = len(seq)
        total = 0.0
        for i in range(n):
            for j in range(n):
                cos = seq[i] @ seq[j] / (np.linalg.norm(seq[i]) * np.linalg.norm(seq[j]))
                total += math.exp(beta * cos)
        per_sequence.append(total / n**2)
    return float(np.mean(per_sequence))


def test_interaction_energy_of_identical_directions_is_e():
    direction = torch.randn(16)
    x = direction * torch.rand(3, 10, 1).add(0.5)  # (B, T, d): one direction, different lengths
    assert interaction_energy(x).item() == pytest.approx(math.e, rel=1e-6)


def test_interaction_energy_lies_between_inverse_e_and_e():
    torch.manual_seed(0)
    v = torch.randn(8)
    cases = [
        torch.randn(4, 12, 8),  # random directions
        torch.stack([v, -v] * 6)[None],  # antipodal pairs: the lowest a sequence can go
        torch.randn(2, 5, 3).abs(),  # all in one orthant
    ]
    for x in cases:
        value = interaction_energy(x).item()
        assert math.exp(-1) - 1e-6 <= value <= math.e + 1e-6
    assert interaction_energy(cases[1]).item() == pytest.approx(math.cosh(1), rel=1e-6)  # half e, half 1/e


def test_interaction_energy_equals_direct_numpy_computation():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 7)  # (layers, B, T, d)
    for beta in (1.0, 2.5):
        ours = interaction_energy(x, beta)
        assert ours.shape == (2,)
        for layer in range(2):
            assert ours[layer].item() == pytest.approx(numpy_interaction_energy(x[layer].numpy().astype(np.float64), beta), rel=1e-5)


def test_kl_unigram_equals_direct_numpy_computation_in_both_directions():
    torch.manual_seed(2)
    logits = torch.randn(3, 6, 11)
    counts = torch.randint(0, 20, (9,)).float()  # shorter than the vocabulary: the last two tokens count 0
    mask = torch.rand(3, 6) > 0.3
    log_q = unigram_log_probs(counts, 11, smoothing=0.5)
    q = (np.concatenate([counts.numpy(), [0, 0]]) + 0.5)
    q = q / q.sum()
    p = torch.softmax(logits, -1).numpy().astype(np.float64)
    forward = (p * (np.log(p) - np.log(q))).sum(-1)
    reverse = (q * (np.log(q) - np.log(p))).sum(-1)
    m = mask.numpy()
    assert kl_to_unigram(logits, log_q, mask).item() == pytest.approx(forward[m].mean(), rel=1e-5)
    assert kl_to_unigram(logits, log_q, mask, reverse=True).item() == pytest.approx(reverse[m].mean(), rel=1e-5)
    assert kl_to_unigram(logits, log_q).item() == pytest.approx(forward.mean(), rel=1e-5)


def test_smoothing_leaves_no_token_without_mass():
    log_q = unigram_log_probs(torch.tensor([10.0, 0.0, 5.0]), 5, smoothing=1.0)
    assert torch.isfinite(log_q).all() and log_q.exp().sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smoothing"):
        unigram_log_probs(torch.tensor([10.0, 0.0]), 2, smoothing=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        unigram_log_probs(torch.ones(6), 5)


def tiny_model(n_layers: int = 2):
    torch.manual_seed(0)
    return pl.build_model(pl.ModelConfig(n_layers=n_layers, n_heads=2, d_model=16, d_vocab=12, n_ctx=16, d_mlp=32))


def test_kl_is_zero_when_the_model_predicts_the_unigram_distribution():
    model = tiny_model()
    counts = torch.arange(1, 13).float() ** 2  # far from uniform
    with torch.no_grad():  # the unembedding ignores the stream and emits log p_unigram
        model.W_U.zero_()
        model.b_U.copy_(unigram_log_probs(counts, 12, smoothing=1.0))
    batch = TaskBatch.coerce(torch.randint(0, 12, (4, 16)))
    ((_, measurements),) = measure_model(model, batch, [GeometryProbe(unigram=counts, reverse=True)])
    values = {m.metric: m.value for m in measurements}
    assert values["kl_unigram"].item() == pytest.approx(0.0, abs=1e-5)
    assert values["kl_unigram_reverse"].item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():  # a model that predicts anything else is measurably away from it
        model.b_U.zero_()
    ((_, measurements),) = measure_model(model, batch, [GeometryProbe(unigram=counts)])
    assert measurements[1].value.item() > 0.1


def test_geometry_probe_reads_embeddings_every_block_and_the_final_norm():
    model = tiny_model(n_layers=3)
    batch = TaskBatch.coerce(torch.randint(0, 12, (4, 16)))
    ((_, measurements),) = measure_model(model, batch, [GeometryProbe(kl=False, beta=2.0)])
    (ie,) = measurements
    assert ie.metric == "interaction_energy" and ie.value.shape == (5,)  # embeddings, 3 blocks, final norm
    _, cache = model.run_with_cache(batch.tokens)
    assert ie.value[0].item() == pytest.approx(interaction_energy(cache["blocks.0.hook_resid_pre"], 2.0).item(), rel=1e-5)
    assert ie.value[2].item() == pytest.approx(interaction_energy(cache["blocks.1.hook_resid_post"], 2.0).item(), rel=1e-5)
    assert ie.value[4].item() == pytest.approx(interaction_energy(cache["ln_final.hook_normalized"], 2.0).item(), rel=1e-5)


def test_kl_without_counts_says_how_to_give_them():
    model = tiny_model()
    with pytest.raises(ValueError, match="unigram=COUNTS"):
        measure_model(model, TaskBatch.coerce(torch.randint(0, 12, (2, 16))), [GeometryProbe()])


def test_trained_run_logs_geometry_live_every_n_steps_and_at_checkpoints(tmp_path):
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    config = load_config("induction", ["train.steps=12", "train.checkpoint_every=6", "telemetry.every=2",
                                       "telemetry.geometry_every=4", "telemetry.probes=[loss,geometry]",
                                       "model.n_ctx=32", "data.max_len=12", "data.probe_size=8", "train.threads=1"])
    train(config, tmp_path / "run", progress=False)
    run = pl.open_run(tmp_path / "run")
    counts = json.loads((run.path / "unigram.json").read_text())["counts"]
    assert len(counts) == 64 and sum(counts) == 64 * 32 * 32  # 64 sampled training batches of 32 × 32 tokens
    live = run.metrics(probe="geometry", source="live")
    assert sorted(live["step"].unique()) == [0, 4, 8]
    ie = live[live["metric"] == "interaction_energy"]
    assert sorted(ie["layer"].unique()) == [0, 1, 2, 3] and ie["value"].between(math.exp(-1), math.e).all()
    checkpoint = run.metrics(probe="geometry", source="checkpoint", metric="kl_unigram")
    assert sorted(checkpoint["step"]) == [0, 6, 12] and (checkpoint["value"] >= 0).all()
    # the same probe post-hoc on a checkpoint gives the numbers training stored there
    ((_, measurements),) = measure_model(run.load_model(6), run.probe_batch(), [GeometryProbe(unigram=run.path / "unigram.json")])
    kl = {m.metric: m.value for m in measurements}["kl_unigram"].item()
    assert kl == pytest.approx(checkpoint.set_index("step").loc[6, "value"], rel=1e-4)
    report = pl.write_report(run)
    assert "## Residual-stream geometry" in report.read_text() and (report.parent / "geometry.png").is_file()


def test_post_hoc_geometry_on_a_run_without_counts_counts_its_training_data_first(run_copy):
    from phaselens.posthoc.runner import run_probes

    (run_copy / "unigram.json").unlink()  # a run trained before runs kept their token counts
    result = run_probes(run_copy, probes=["geometry"], progress=False)
    assert result.ok and result.measured == [0, 10, 20]
    assert "sampled training batches" in json.loads((run_copy / "unigram.json").read_text())["source"]
    kl = pl.open_run(run_copy).metrics(probe="geometry", metric="kl_unigram", source="checkpoint")
    assert len(kl) == 3 and (kl["value"] > 0).all()


def test_critical_points_ignore_wiggles_smaller_than_the_tolerance():
    x = np.linspace(0, 1, 41)
    curve = np.where(x < 0.5, x, 1 - x) + 0.01 * np.sin(60 * x)  # one peak at 0.5, plus small ripples
    assert critical_points(curve) == [20]
    assert critical_points(np.linspace(0, 1, 30)) == []


def test_phases_are_cut_at_the_critical_points_of_both_curves():
    steps = np.arange(0, 1000, 10)
    kl = np.where(steps < 600, 3 - steps / 300, 1 + (steps - 600) / 400)  # falls to step 600, then rises
    ie = np.where(steps < 300, 1.2 + steps / 300, 2.2 - (steps - 300) / 1000)  # rises to step 300, then eases off
    phases, points = geometry_phases(steps, ie, kl)
    (kl_turn,), (ie_turn,) = points["kl"], points["ie"]
    assert abs(kl_turn - 600) <= 50 and abs(ie_turn - 300) <= 50  # smoothing (9 checkpoints here) may shift a kink
    assert [(p.start, p.end) for p in phases] == [(0, ie_turn), (ie_turn, kl_turn), (kl_turn, 990)]
    assert [p.description() for p in phases] == [
        "KL falling while IE rises", "KL and IE both falling", "KL rising while IE falls"]


def test_geometry_figure_uses_a_log_step_axis_for_log_spaced_checkpoints():
    from phaselens.report.geometry import log_spaced
    from phaselens.series import pythia_schedule, revision_step

    assert log_spaced([revision_step(r) for r in pythia_schedule(every=10)])
    assert not log_spaced(range(0, 3001, 100))
