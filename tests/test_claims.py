"""The claims corpus: every headline sentence a report prints agrees with an independent computation on the same run.

- induction: the head the demo names first is the one whose mean ablation costs the copy loss most (our own ablation,
  with the model's own hooks, on the run's probe batch), and every named head is ordered by that cost;
- late disambiguation: the headline transition is the drop *from* the log K plateau and its window contains τ (a run
  directory written by our own writers, with a plateau-then-drop first-target loss: training disamb_small costs minutes);
- no transition or phase below its documented floor in any table;
- synthetic series for which the detector reports exactly what is there (flat with noise, a 5-point series, a trivial
  move beside a large one; the clean step, two steps and a slow drift are in tests/test_transitions.py).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

import phaselens as pl
from phaselens.analysis.phases import MIN_PHASE_CHECKPOINTS, MIN_PHASE_EFFECT, geometry_phases
from phaselens.signals.transitions import MIN_EFFECT, detect_transitions, find_transitions
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import RunRecord
from phaselens.training.config import load_config
from test_transitions import STEPS, noisy

NAMED = re.compile(r"^(Induction|Previous-token) heads?: (.*)\.$")
HEAD = re.compile(r"L(\d+)H(\d+) \(")


def _copy_loss_with_head_mean_ablated(model, batch, layer: int, head: int | None) -> float:
    """The copy-position loss on `batch` with one head's mixed values replaced by their batch mean (None: clean)."""
    import torch
    import torch.nn.functional as F

    tokens = batch.tokens
    copy = batch.positions["copy"] & batch.loss_mask  # (B, T-1): the predictions an induction head can make

    def mean_head(z, hook):  # z (B, T, H, dh)
        z = z.clone()
        z[:, :, head] = z[:, :, head].mean((0, 1), keepdim=True)
        return z

    with torch.no_grad():
        hooks = [] if head is None else [(f"blocks.{layer}.attn.hook_z", mean_head)]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)  # (B, T, V)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T-1)
    return float(losses[copy].mean())


@pytest.mark.slow
def test_the_induction_head_named_first_is_the_one_whose_ablation_costs_the_copy_loss_most(reference_demo_run):
    path, printed = reference_demo_run
    run = pl.open_run(path)
    model, batch = run.load_model(), run.probe_batch()
    lines = {m.group(1): m.group(2) for m in map(NAMED.match, printed.splitlines()) if m}
    assert set(lines) == {"Induction", "Previous-token"}, printed
    clean = _copy_loss_with_head_mean_ablated(model, batch, 0, None)
    for role, named in lines.items():
        assert "ranked by the copy-position loss with each head mean-ablated" in named
        heads = [(int(a), int(b)) for a, b in HEAD.findall(named)]
        costs = [_copy_loss_with_head_mean_ablated(model, batch, layer, head) for layer, head in heads]
        assert costs == sorted(costs, reverse=True), f"{role} heads {heads} are not ordered by ablation cost {costs}"
        assert all(cost > clean + 0.5 for cost in costs), (role, clean, costs)  # each named head does something
        first = named.split(";")[0]  # "L1H1 (ablating it: copy loss 0.44 → 3.45 at step 3000"
        printed_clean, printed_cost = (float(v) for v in re.search(r"copy loss ([\d.]+) → ([\d.]+)", first).groups())
        assert printed_clean == pytest.approx(clean, abs=0.011) and printed_cost == pytest.approx(costs[0], abs=0.011)
    induction_heads = [(int(a), int(b)) for a, b in HEAD.findall(lines["Induction"])]
    assert len(induction_heads) == 2 and {layer for layer, _ in induction_heads} == {1}  # both layer-1 heads copy


K = 10


def _disambiguation_run(path) -> pl.Run:
    """A disamb_small (K = 10) run directory with our writers: a first-target loss that descends to log K by step 100
    (the strong early change), waits on the plateau and drops from it around step 900; the z-shuffle gap opens with it."""
    RunDir(path).write(RunRecord(name="plateau", status="finished", config=load_config("disamb_small", [f"data.k={K}"]).to_dict()))
    steps = np.arange(0, 1500, 10)
    rng = np.random.default_rng(0)
    log_k = math.log(K)
    loss = 4.6 - (4.6 - log_k) * np.clip(steps / 100, 0, 1) - (log_k - 0.1) / (1 + np.exp(-(steps - 930) / 40))
    gap = 2.0 / (1 + np.exp(-(steps - 930) / 40))
    rows = [(int(s), "loss", "first_target", None, None, float(v), "live") for s, v in zip(steps, loss + rng.normal(0, 0.02, len(steps)))]
    rows += [(int(s), "loss", "z_shuffle_gap", None, None, float(v), "live") for s, v in zip(steps, gap + rng.normal(0, 0.02, len(steps)))]
    store = MetricsStore(RunDir(path).metrics_db)
    store.write(rows)
    store.close()
    return pl.open_run(path)


def test_the_disambiguation_headline_transition_is_the_drop_from_the_plateau_and_contains_tau(tmp_path):
    from phaselens.analysis.disambiguation import disambiguation_headline, summarize_disambiguation

    run = _disambiguation_run(tmp_path / "run")
    loss = run.metrics(probe="loss", metric="first_target").set_index("step")["value"]
    tau = int(loss[loss.rolling(5, center=True, min_periods=1).median() < 0.5 * math.log(K)].index[0])  # our own τ
    assert 880 <= tau <= 980
    every = run.transitions(probe="loss", metric="first_target")
    assert (every["step"] < 200).any(), "the descent to the plateau is a transition too (and the stronger one)"
    (headline,) = run.headline_transitions().itertuples()
    assert headline.start <= tau <= headline.end and headline.start >= 700
    summary = summarize_disambiguation(run)
    assert summary.tau == tau
    assert (summary.alignment.reference["start"], summary.alignment.reference["end"]) == (headline.start, headline.end)
    assert disambiguation_headline(run)["step_first_target"] == headline.step


def _table_rows(report: str, header: str) -> list[dict[str, str]]:
    """The rows of the markdown table under `header` (its first line) in `report`, as dicts."""
    lines = report.split(header, 1)[1].splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.mark.slow
def test_no_transition_in_the_demo_report_is_below_the_floor(reference_demo_run):
    path, _ = reference_demo_run
    report = (path / "report" / "report.md").read_text()
    rows = _table_rows(report, "| probe | metric | layer | head | step | start | end | before | after | effect | source |")
    assert rows, "the demo has transitions"
    assert all(float(r["effect"]) >= MIN_EFFECT - 5e-4 for r in rows)  # printed to 3 decimals
    transitions = pl.open_run(path).transitions()
    assert (transitions["effect"] >= MIN_EFFECT).all() and (transitions["strength"] > 3).all()


def test_a_flat_noisy_series_has_no_transition():
    assert find_transitions(STEPS, noisy(np.full(len(STEPS), 2.0), sigma=0.05)) == []


def test_a_five_point_series_has_no_transition_however_clear_its_step():
    assert find_transitions(np.arange(0, 500, 100), np.array([4.0, 4.0, 1.0, 1.0, 1.0])) == []


def test_a_trivial_move_of_one_head_beside_a_large_one_is_not_a_transition():
    """The imported series' `induction L0H1 0.041 → 0.038` on a nearly noiseless 15-point curve, while another head of
    the same metric spans 0 → 0.7: only the large move is a transition."""
    steps = np.arange(15) * 1000
    quiet = 0.041 - 0.003 * (steps >= 7000) + np.random.default_rng(1).normal(0, 1e-5, 15)
    rises = 0.7 / (1 + np.exp(-(steps - 7000) / 500))
    frame = pd.DataFrame([{"step": int(s), "probe": "heads", "metric": "induction", "layer": 0, "head": h, "value": float(v),
                           "source": "checkpoint"} for h, series in ((1, quiet), (0, rises)) for s, v in zip(steps, series)])
    found = detect_transitions(frame)
    assert found["head"].tolist() == [0] and (found["effect"] >= MIN_EFFECT).all()


def test_geometry_phases_pass_their_floors_a_five_checkpoint_series_is_not_cut_in_three():
    steps = np.arange(5) * 100
    phases, _ = geometry_phases(steps, [1.0, 1.3, 1.1, 1.4, 1.2], [3.0, 2.5, 2.8, 2.2, 2.4])
    assert len(phases) <= 2
    # IE peaks at the second checkpoint: "KL falling while IE rises: steps 0–100" (KL 0.121 → 0.103) is no phase
    steps = np.arange(0, 900, 100)
    kl = [0.121, 0.103, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    ie = [1.0, 2.0, 1.9, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2]
    phases, points = geometry_phases(steps, ie, kl)
    assert phases and all(p.checkpoints >= MIN_PHASE_CHECKPOINTS and p.effect >= MIN_PHASE_EFFECT for p in phases)
    assert all(p.end - p.start > 100 for p in phases) and 100 not in points["ie"]


def test_a_clean_turn_still_cuts_two_phases():
    steps = np.arange(0, 1000, 10)
    kl = np.where(steps < 500, 3 - steps / 250, 1 + (steps - 500) / 250)  # falls, then rises
    phases, points = geometry_phases(steps, np.full(len(steps), 1.5), kl)
    assert [p.kl for p in phases] == ["falling", "rising"] and abs(points["kl"][0] - 500) <= 30


def _sparse_activations(tokens: int, seed: int = 0):
    """(1, tokens, 64) activations of 64 neurons firing at rates from 0.05% to 30%: the rarest look dead on few tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rates = torch.logspace(-3.3, -0.5, 64)  # (64,)
    fires = torch.rand(1, tokens, 64, generator=generator) < rates
    return torch.where(fires, torch.rand(1, tokens, 64, generator=generator) + 0.1, torch.zeros(()))


def test_selectivity_ranks_only_neurons_that_fire_on_the_documented_minimum_of_tokens():
    import torch

    from phaselens.analysis.neurons import most_selective
    from phaselens.probes.neurons import NeuronStats
    from phaselens.store.neuron_artifact import MIN_FIRING_TOKENS

    act = torch.zeros(1, 2000, 3)
    act[0, :4, 0] = 0.004  # near-dead: 4 tokens, the highest max / mean of all
    act[0, ::10, 1] = 1.0  # 200 tokens
    act[0, ::2, 2] = 1.0  # 1,000 tokens, max / mean 2
    stats = NeuronStats(3, top_k=3)
    stats.update(act)
    assert float(stats.selectivity()[0]) > float(stats.selectivity()[1]) > float(stats.selectivity()[2])
    assert most_selective(stats, 3) == [1, 2] and 4 < MIN_FIRING_TOKENS <= 200


def test_a_context_of_a_small_activation_prints_three_significant_figures():
    from phaselens.analysis.neuron_report import top_contexts_section
    from phaselens.analysis.neurons import TokenStream, context
    from phaselens.store.neuron_artifact import NeuronArtifact, NeuronLayer, SelectiveNeuron

    import torch

    stream = TokenStream(torch.tensor(list(b"the cat sat on the mat")), "bytes")
    entry = context(stream, 4, 4, 1.53217e-6)  # a BDH neuron's strongest activations can be this small
    layer = NeuronLayer(0, "blocks.0.mlp.hook_post", 1, {}, [0.1], [0.0], [0.0], [1.0], [[0.0]], [[4]],
                        [SelectiveNeuron(0, 0.1, 9.0, [entry])])
    text = top_contexts_section(NeuronArtifact(None, 22, 0.0, 1, 4, "text", "bytes", [], [layer]))
    assert "`1.53e-06`" in text and "`0.000`" not in text


def test_the_run_report_and_the_scan_give_one_dead_fraction_for_one_step(tmp_path):
    """The report's neuron table at a step the scan measured quotes the scan (the same function, on more tokens)."""
    from phaselens.analysis.neurons import NeuronScan, TokenStream, scan_to_artifact
    from phaselens.probes.neurons import NeuronStats, dead_fraction
    from phaselens.report.neurons import neurons_section
    from phaselens.store.neuron_artifact import write_neuron_artifact

    import torch

    path = tmp_path / "run"
    run_dir = RunDir(path)
    run_dir.write(RunRecord(name="neurons", status="finished", config=load_config("induction", []).to_dict()))
    act = _sparse_activations(20_000)  # (1, 20000, 64)
    probe_batch, scan = NeuronStats(64, top_k=0), NeuronStats(64, top_k=3)
    probe_batch.update(act[:, :512])
    scan.update(act)
    assert float(dead_fraction(probe_batch.count)) > float(dead_fraction(scan.count))  # a small sample: more look dead
    store = MetricsStore(run_dir.metrics_db)
    store.write([(step, "neurons", metric, 0, None, float(value), "checkpoint")
                 for step in (0, 10) for metric, value in probe_batch.summary().items()])
    store.close()
    stream = TokenStream(torch.zeros(20_000, dtype=torch.long), "ids", "held-out tokens")
    artifact = scan_to_artifact(NeuronScan([(0, "blocks.0.mlp.hook_post")], [scan], stream, 0.0, 3, step=10), window=4)
    write_neuron_artifact(run_dir.artifacts / "neurons" / "step_00000010.json", artifact)
    (tmp_path / "out").mkdir()
    section = neurons_section(pl.open_run(path), tmp_path / "out")
    (row,) = _table_rows(section, "| layer | mean firing rate | rare (<1%) | dead | median selectivity |")
    assert row["dead"] == f"{100 * float(dead_fraction(scan.count)):.1f}%" == f"{100 * artifact.layers[0].summary['frac_dead']:.1f}%"
    assert "20,000 tokens" in section


def test_the_claims_pages_examples_run_as_written(capsys):
    """docs/concepts/claims.md: the transition floors on a clean drop, noise and five points; the phase floors."""
    from test_docs import page_block

    namespace: dict = {}
    exec(page_block("docs/concepts/claims.md", "find_transitions(steps, loss)"), namespace)
    assert namespace["flat"] == [] and namespace["short"] == []
    exec(page_block("docs/concepts/claims.md", "geometry_phases(steps, ie, kl)"), namespace)
    assert namespace["phases"] and all(p.start != 0 or p.end != 100 for p in namespace["phases"])
    printed = capsys.readouterr().out
    assert "effect" in printed and "steps 0–100" not in printed
