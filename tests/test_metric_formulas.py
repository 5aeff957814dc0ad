"""Metric formulas against values worked out by hand from the definitions in PRODUCT.md.

Expected numbers are written out with `math.log` on small causal patterns, never computed by
the code under test, so each test pins the formula itself (nats, which queries count, which
normaliser, which variance).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from phaselens.models import ModelConfig, build_model
from phaselens.models.transformer import Transformer  # noqa: F401  (TransformerLens loads slowly: pay it at collection)
from phaselens.probes.attention import (
    attention_coherence,
    attention_entropy,
    attention_head_variance,
    attention_specialization,
)
from phaselens.probes.base import Measurement, Probe, ProbeInputs
from phaselens.probes.heads import detection_patterns, head_score
from phaselens.probes.live import Telemetry
from phaselens.probes.loss import LossProbe, token_losses
from phaselens.probes.measure import measure_cache
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.induction import InductionTask


def h(*probs: float) -> float:
    """Shannon entropy in nats, written out by hand."""
    return -sum(p * math.log(p) for p in probs if p > 0)


# Two heads over T = 3 causal positions; row q may attend to keys 0..q (zeros after).
HEAD_0 = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.0],
    [0.2, 0.3, 0.5],
]
HEAD_1 = [
    [1.0, 0.0, 0.0],
    [0.9, 0.1, 0.0],
    [0.0, 0.0, 1.0],
]


def two_head_pattern() -> torch.Tensor:
    return torch.tensor([[HEAD_0, HEAD_1]], dtype=torch.float64)  # (B=1, H=2, Q=3, K=3)


def one_hot_heads() -> torch.Tensor:
    """Head 0 always attends to key 0 (BOS-like), head 1 always to the current token."""
    first = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    diagonal = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    return torch.tensor([[first, diagonal]], dtype=torch.float64)  # (1, 2, 3, 3)


# ---------------------------------------------------------------------------- attention


def test_entropy_is_in_nats_and_averages_queries_from_position_one():
    entropy = attention_entropy(two_head_pattern())  # (H,)
    # Query 0 has a single allowed key (entropy 0) and is left out: divide by 2, not 3.
    head_0 = (math.log(2) + h(0.2, 0.3, 0.5)) / 2
    head_1 = (h(0.9, 0.1) + 0.0) / 2
    assert entropy.shape == (2,)
    assert entropy.tolist() == pytest.approx([head_0, head_1], abs=1e-12)


def test_entropy_of_uniform_causal_attention_is_mean_log_key_count():
    uniform = torch.tensor([[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0], [1 / 4] * 4], dtype=torch.float64)
    pattern = uniform.expand(1, 1, 4, 4)  # (B=1, H=1, 4, 4)
    expected = (math.log(2) + math.log(3) + math.log(4)) / 3
    assert attention_entropy(pattern).item() == pytest.approx(expected, abs=1e-12)


def test_every_attention_metric_averages_over_the_batch():
    pattern = torch.cat([two_head_pattern(), one_hot_heads()])  # (B=2, H=2, 3, 3)
    head_0 = (math.log(2) + h(0.2, 0.3, 0.5) + 0.0 + 0.0) / 4
    head_1 = (h(0.9, 0.1) + 0.0 + 0.0 + 0.0) / 4
    assert attention_entropy(pattern).tolist() == pytest.approx([head_0, head_1], abs=1e-12)
    coherence_0 = ((1 - 1) + (1 - h(0.2, 0.3, 0.5) / math.log(3)) + 1 + 1) / 4
    coherence_1 = ((1 - h(0.9, 0.1) / math.log(2)) + 1 + 1 + 1) / 4
    assert attention_coherence(pattern).tolist() == pytest.approx([coherence_0, coherence_1], abs=1e-12)
    # specialization over 2 x 3 (batch, query) rows: first sequence 0, .2, .25; second 0, .5, .5
    per_layer, per_head = attention_specialization(pattern)
    assert per_layer.item() == pytest.approx((0.2 + 0.25 + 0.5 + 0.5) / 6, abs=1e-12)
    # head variance over 2 x 3 x 3 cells: 0.175 from the first sequence, 4 x ¼ from the second
    assert attention_head_variance(pattern).item() == pytest.approx((0.175 + 1.0) / 18, abs=1e-12)


def test_coherence_normalises_each_row_by_its_own_key_count():
    coherence = attention_coherence(two_head_pattern())  # (H,)
    # Row q has q + 1 allowed keys: row 1 is divided by log 2, row 2 by log 3 (never log T for all).
    head_0 = ((1 - math.log(2) / math.log(2)) + (1 - h(0.2, 0.3, 0.5) / math.log(3))) / 2
    head_1 = ((1 - h(0.9, 0.1) / math.log(2)) + (1 - 0.0 / math.log(3))) / 2
    assert coherence.tolist() == pytest.approx([head_0, head_1], abs=1e-12)


def test_coherence_is_zero_for_uniform_and_one_for_single_key_attention():
    uniform = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    assert attention_coherence(uniform.expand(1, 1, 3, 3)).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_coherence(one_hot_heads()).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_specialization_is_total_variation_from_the_mean_head_over_all_queries():
    per_layer, per_head = attention_specialization(two_head_pattern())
    # With two heads, ½‖P_h − P̄‖₁ = ¼‖P_0 − P_1‖₁ for either head.
    row_0 = 0.0
    row_1 = 0.25 * (0.4 + 0.4 + 0.0)
    row_2 = 0.25 * (0.2 + 0.3 + 0.5)
    expected = (row_0 + row_1 + row_2) / 3  # every query position counts, query 0 included
    assert per_head.shape == (2,)
    assert per_head.tolist() == pytest.approx([expected, expected], abs=1e-12)
    assert per_layer.item() == pytest.approx(expected, abs=1e-12)


def test_specialization_of_heads_on_different_single_keys():
    per_layer, per_head = attention_specialization(one_hot_heads())
    # Query 0: both heads on key 0 (distance 0). Queries 1, 2: disjoint one-hot rows,
    # P̄ = (½, ½) on the two keys, so ½‖P_h − P̄‖₁ = ½(½ + ½) = ½.
    expected = (0.0 + 0.5 + 0.5) / 3
    assert per_head.tolist() == pytest.approx([expected, expected], abs=1e-12)
    assert per_layer.item() == pytest.approx(expected, abs=1e-12)


def test_specialization_is_zero_for_identical_heads_and_within_zero_one():
    same = torch.tensor([[HEAD_0, HEAD_0, HEAD_0]], dtype=torch.float64)  # (1, 3, 3, 3)
    per_layer, per_head = attention_specialization(same)
    assert per_layer.item() == pytest.approx(0.0, abs=1e-12)
    assert per_head.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 8, 6, 6, generator=generator) * 5
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    per_layer, per_head = attention_specialization(scores.softmax(-1))
    assert 0.0 < per_layer.item() <= 1.0
    assert bool(((per_head >= 0) & (per_head <= 1)).all())


def test_head_variance_is_mean_population_variance_across_heads():
    variance = attention_head_variance(two_head_pattern())
    # Population variance of two values a, b is ((a − b) / 2)²; average over all 3×3 (q, k) cells.
    cells = [
        0.0, 0.0, 0.0,
        0.2 ** 2, 0.2 ** 2, 0.0,
        0.1 ** 2, 0.15 ** 2, 0.25 ** 2,
    ]
    assert variance.shape == ()
    assert variance.item() == pytest.approx(sum(cells) / 9, abs=1e-12)


def test_leading_layer_dimension_gives_one_value_per_layer_and_head():
    layers = torch.stack([two_head_pattern(), one_hot_heads()])  # (L=2, B=1, H=2, 3, 3)
    entropy = attention_entropy(layers)
    coherence = attention_coherence(layers)
    per_layer, per_head = attention_specialization(layers)
    variance = attention_head_variance(layers)
    assert entropy.shape == coherence.shape == per_head.shape == (2, 2)
    assert per_layer.shape == variance.shape == (2,)
    assert entropy[0].tolist() == pytest.approx([(math.log(2) + h(0.2, 0.3, 0.5)) / 2, h(0.9, 0.1) / 2], abs=1e-12)
    assert entropy[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert coherence[1].tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert per_layer.tolist() == pytest.approx([(0.2 + 0.25) / 3, 1 / 3], abs=1e-12)
    # one-hot heads: cells differ by 1 in 4 places (queries 1, 2) -> variance ¼ there
    assert variance[1].item() == pytest.approx(4 * 0.25 / 9, abs=1e-12)


# ---------------------------------------------------------------------------- head scores

TOKENS = torch.tensor([[5, 7, 9, 5, 7]])  # (B=1, T=5)


def set_cells(pattern: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in pattern[0].nonzero().tolist()}


def test_detection_patterns_mark_exactly_the_hand_picked_keys():
    detection = detection_patterns(TOKENS)
    assert {name: tuple(d.shape) for name, d in detection.items()} == {
        "induction": (1, 5, 5), "prev_token": (1, 5, 5), "duplicate": (1, 5, 5),
    }
    assert set_cells(detection["prev_token"]) == {(1, 0), (2, 1), (3, 2), (4, 3)}
    # tok_3 = tok_0 = 5 and tok_4 = tok_1 = 7
    assert set_cells(detection["duplicate"]) == {(3, 0), (4, 1)}
    # the token after an earlier copy of the current one: 5 -> key 1 (7), 7 -> key 2 (9)
    assert set_cells(detection["induction"]) == {(3, 1), (4, 2)}


# Rows sum to one and respect the causal mask.
HAND_PATTERN = [
    [1.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0, 0.0],
    [0.2, 0.6, 0.2, 0.0, 0.0],
    [0.1, 0.1, 0.1, 0.7, 0.0],
    [0.0, 0.0, 0.2, 0.3, 0.5],
]


def test_head_score_sums_attention_on_targets_over_rows_that_have_one():
    pattern = torch.tensor([[HAND_PATTERN]], dtype=torch.float64)  # (B=1, H=1, 5, 5)
    detection = detection_patterns(TOKENS)
    # prev_token: rows 1..4 have a target (row 0 does not and is left out of the denominator)
    prev = (0.5 + 0.6 + 0.1 + 0.3) / 4
    # duplicate: rows 3 (key 0) and 4 (key 1)
    duplicate = (0.1 + 0.0) / 2
    # induction: rows 3 (key 1) and 4 (key 2)
    induction = (0.1 + 0.2) / 2
    assert head_score(pattern, detection["prev_token"]).tolist() == pytest.approx([prev], abs=1e-12)
    assert head_score(pattern, detection["duplicate"]).tolist() == pytest.approx([duplicate], abs=1e-12)
    assert head_score(pattern, detection["induction"]).tolist() == pytest.approx([induction], abs=1e-12)


def test_ideal_induction_head_scores_one_and_uniform_attention_the_hand_value():
    induction = detection_patterns(TOKENS)["induction"]  # (1, 5, 5)
    ideal = induction[0].double()
    no_target = ideal.sum(-1) == 0
    ideal[no_target] = torch.eye(5, dtype=torch.float64)[no_target]  # attend to self elsewhere
    ideal = ideal / ideal.sum(-1, keepdim=True)
    causal = torch.ones(5, 5, dtype=torch.float64).tril()
    uniform = causal / causal.sum(-1, keepdim=True)
    pattern = torch.stack([ideal, uniform])[None]  # (B=1, H=2, 5, 5)
    # uniform: row 3 puts 1/4 on its one target, row 4 puts 1/5 on its one target
    assert head_score(pattern, induction).tolist() == pytest.approx([1.0, (1 / 4 + 1 / 5) / 2], abs=1e-12)


def test_head_score_pools_rows_over_the_batch():
    tokens = torch.tensor([[5, 7, 9, 5, 7], [1, 2, 3, 4, 1]])  # second sequence: one duplicate row
    causal = torch.ones(5, 5, dtype=torch.float64).tril()
    uniform = (causal / causal.sum(-1, keepdim=True)).expand(2, 1, 5, 5)  # (B=2, H=1, 5, 5)
    score = head_score(uniform, detection_patterns(tokens)["duplicate"])
    # rows with a target: (b0, q3), (b0, q4), (b1, q4); each row's mass is 1
    assert score.tolist() == pytest.approx([(1 / 4 + 1 / 5 + 1 / 5) / 3], abs=1e-12)


# ---------------------------------------------------------------------------- loss


def ce(logits: list[float], target: int) -> float:
    """Cross-entropy −log softmax(logits)[target], written out."""
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


LOGITS = [
    [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [50.0, -50.0, 0.0]],
    [[0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [-50.0, 50.0, 0.0]],
]
LOSS_TOKENS = [[1, 0, 2], [2, 1, 2]]


def test_token_losses_are_next_token_cross_entropy_per_position():
    losses = token_losses(torch.tensor(LOGITS), torch.tensor(LOSS_TOKENS))  # (B=2, T-1=2)
    expected = [
        [ce(LOGITS[0][0], 0), ce(LOGITS[0][1], 2)],
        [ce(LOGITS[1][0], 1), ce(LOGITS[1][1], 2)],
    ]
    assert losses.shape == (2, 2)
    assert losses.tolist()[0] == pytest.approx(expected[0], abs=1e-5)
    assert losses.tolist()[1] == pytest.approx(expected[1], abs=1e-5)


def test_loss_probe_splits_copy_and_non_copy_positions_within_the_loss_mask():
    batch = TaskBatch(
        tokens=torch.tensor(LOSS_TOKENS),
        loss_mask=torch.tensor([[True, True], [True, False]]),
        positions={"copy": torch.tensor([[False, True], [True, False]])},
    )
    inputs = ProbeInputs(acts={}, batch=batch, model=None, logits=torch.tensor(LOGITS))
    values = {m.metric: m.value.item() for m in LossProbe(positions=["copy"], complements=["copy"]).compute(inputs)}
    # (1, 1) is outside the loss mask, so non_copy is position (0, 0) alone
    assert values == {
        "all": pytest.approx((ce(LOGITS[0][0], 0) + ce(LOGITS[0][1], 2) + ce(LOGITS[1][0], 1)) / 3, abs=1e-5),
        "copy": pytest.approx((ce(LOGITS[0][1], 2) + ce(LOGITS[1][0], 1)) / 2, abs=1e-5),
        "non_copy": pytest.approx(ce(LOGITS[0][0], 0), abs=1e-5),
    }


# ---------------------------------------------------------------------------- measure_cache


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=11, n_ctx=8))


def test_measure_cache_gives_the_formula_values_of_the_cached_patterns(tiny_model):
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    _, cache = tiny_model.run_with_cache(tokens)
    frame = measure_cache(cache, tokens, probes=["attention"], model=tiny_model)
    assert list(frame.columns) == ["step", "probe", "metric", "layer", "head", "value", "source"]
    for metric, formula in (("entropy", attention_entropy), ("coherence", attention_coherence)):
        rows = frame[(frame.probe == "attention") & (frame.metric == metric)]
        assert sorted(zip(rows.layer, rows["head"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for layer in range(2):
            expected = formula(cache[f"blocks.{layer}.attn.hook_pattern"])  # (H,)
            for head in range(2):
                value = rows[(rows.layer == layer) & (rows["head"] == head)].value.item()
                assert value == pytest.approx(expected[head].item(), rel=1e-6)
    variance = frame[frame.metric == "head_variance"]
    assert variance["head"].isna().all()
    for layer in range(2):
        expected = attention_head_variance(cache[f"blocks.{layer}.attn.hook_pattern"]).item()
        assert variance[variance.layer == layer].value.item() == pytest.approx(expected, rel=1e-6)


def test_measure_cache_head_scores_use_the_detection_patterns_of_the_given_tokens(tiny_model):
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(2))
    _, cache = tiny_model.run_with_cache(tokens)
    frame = measure_cache(cache, tokens, probes=["heads"], model=tiny_model)
    detection = detection_patterns(tokens)
    for name in ("induction", "prev_token", "duplicate"):
        rows = frame[frame.metric == name]
        assert len(rows) == 4
        for layer in range(2):
            expected = head_score(cache[f"blocks.{layer}.attn.hook_pattern"], detection[name])  # (H,)
            got = rows[rows.layer == layer].sort_values("head").value.tolist()
            assert got == pytest.approx(expected.tolist(), rel=1e-6)


def test_measure_cache_loss_probe_splits_a_task_batch_by_its_copy_positions(tiny_model):
    batch = InductionTask(seq_len=8, vocab=11, min_len=3, max_len=4).sample(4, torch.Generator().manual_seed(0))
    logits, cache = tiny_model.run_with_cache(batch.tokens)
    frame = measure_cache(cache, batch, probes=[LossProbe(positions=["copy"], complements=["copy"])], model=tiny_model, logits=logits)
    losses = token_losses(logits, batch.tokens)  # (B, T-1)
    values = dict(zip(frame.metric, frame.value))
    copies = batch.positions["copy"]
    assert values["copy"] == pytest.approx(losses[copies].mean().item(), rel=1e-5)
    assert values["non_copy"] == pytest.approx(losses[~copies].mean().item(), rel=1e-5)


def test_measure_cache_with_the_loss_probe_accepts_plain_tokens(tiny_model):
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(3))
    logits, cache = tiny_model.run_with_cache(tokens)
    frame = measure_cache(cache, tokens, probes=["attention", "loss"], model=tiny_model, logits=logits)
    assert set(frame.probe) >= {"attention"}


# ---------------------------------------------------------------------------- induction task


def copy_offset(tokens: torch.Tensor, copy_positions: list[int]) -> int | None:
    """The smallest d with tok[t − d] = tok[t] and tok[t + 1 − d] = tok[t + 1] at every copy position."""
    for d in range(1, tokens.shape[0]):
        if all(t - d >= 0 and tokens[t - d] == tokens[t] and tokens[t + 1 - d] == tokens[t + 1] for t in copy_positions):
            return d
    return None


def test_every_copy_position_predicts_the_token_after_an_earlier_occurrence():
    task = InductionTask(seq_len=64, vocab=64)
    batch = task.sample(16, torch.Generator().manual_seed(0))
    assert batch.tokens.shape == (16, 64) and batch.positions["copy"].shape == (16, 63)
    offsets = []
    for row in range(16):
        positions = batch.positions["copy"][row].nonzero().flatten().tolist()
        # the repeat is min_len..max_len tokens long: length − 1 predictions can be copied
        assert task.min_len - 1 <= len(positions) <= task.max_len - 1
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous segment
        offset = copy_offset(batch.tokens[row], positions)
        assert offset is not None, f"row {row}: copy positions are not a repeat of an earlier segment"
        offsets.append(offset)
    assert len(set(offsets)) > 1, "variable_offset must vary the distance to the repeat"


def test_half_repeat_copies_the_first_half_at_offset_half_the_length():
    batch = InductionTask(seq_len=64, vocab=64, variant="half_repeat").sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(batch.tokens[:, 32:], batch.tokens[:, :32])
    expected_mask = torch.zeros(4, 63, dtype=torch.bool)
    expected_mask[:, 32:] = True  # position 31 predicts token 32, a copy of token 0 no head can foresee
    assert torch.equal(batch.positions["copy"], expected_mask)


def test_same_seed_gives_the_same_batch():
    task = InductionTask(seq_len=64, vocab=64)
    a = task.sample(8, torch.Generator().manual_seed(0))
    b = task.sample(8, torch.Generator().manual_seed(0))
    c = task.sample(8, torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions["copy"], b.positions["copy"])
    assert not torch.equal(a.tokens, c.tokens)


# ---------------------------------------------------------------------------- live telemetry


def train_with_telemetry(every: int, steps: int, background: bool = False):
    """A user's own loop: returns the telemetry frame and the entropy expected at each step."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=11, n_ctx=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    telemetry = Telemetry(model, probes=["attention"], store=None, every=every, background=background)
    assert telemetry.in_background == background
    generator = torch.Generator().manual_seed(0)
    expected = {}
    for step in range(steps):
        tokens = torch.randint(0, 11, (4, 8), generator=generator)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        expected[step] = torch.stack([attention_entropy(cache[f"blocks.{l}.attn.hook_pattern"]) for l in range(2)])
        with telemetry.step(step, tokens):
            logits = model(tokens)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frame = telemetry.dataframe()
    telemetry.close()
    return frame, expected


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background-thread"])
def test_telemetry_logs_one_entropy_row_per_step_layer_and_head_equal_to_the_formula(background):
    # On the background thread the optimizer updates the weights while the probe reads the
    # step's activations: the values must still be those of the forward that made them.
    frame, expected = train_with_telemetry(every=1, steps=4, background=background)
    entropy = frame[(frame.probe == "attention") & (frame.metric == "entropy")]
    assert len(entropy) == 4 * 2 * 2
    assert not entropy.duplicated(["step", "layer", "head"]).any()
    assert set(entropy.source) == {"live"}
    for row in entropy.itertuples():
        assert row.value == pytest.approx(expected[row.step][row.layer, row.head].item(), rel=1e-5)
    # the weights change between steps, so the values must too
    assert entropy[entropy.step == 0].value.tolist() != entropy[entropy.step == 3].value.tolist()


def test_telemetry_every_two_logs_only_even_steps():
    frame, expected = train_with_telemetry(every=2, steps=6)
    entropy = frame[frame.metric == "entropy"]
    assert sorted(set(entropy.step)) == [0, 2, 4]
    for row in entropy.itertuples():
        assert row.value == pytest.approx(expected[row.step][row.layer, row.head].item(), rel=1e-5)


def test_telemetry_with_default_probes_accepts_plain_token_batches():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=11, n_ctx=8))
    telemetry = Telemetry(model, store=None)
    tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(0))
    with telemetry.step(0, tokens):
        model(tokens)
    frame = telemetry.dataframe()
    telemetry.close()
    assert {"attention", "heads"} <= set(frame.probe)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background-thread"])
def test_telemetry_head_scores_follow_a_token_buffer_refilled_in_place(background):
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=11, n_ctx=8))
    telemetry = Telemetry(model, probes=["heads"], store=None, background=background)
    buffer = torch.empty(4, 8, dtype=torch.long)  # reused every step, as with pinned-memory loaders
    generator = torch.Generator().manual_seed(0)
    expected = {}
    for step in range(2):
        buffer.copy_(torch.randint(0, 11, (4, 8), generator=generator))
        with torch.no_grad():
            _, cache = model.run_with_cache(buffer)
        patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(2)])  # (L, B, H, Q, K)
        expected[step] = head_score(patterns, detection_patterns(buffer)["induction"])  # (L, H)
        with telemetry.step(step, buffer):
            model(buffer)
    frame = telemetry.dataframe()
    telemetry.close()
    induction = frame[frame.metric == "induction"]
    for row in induction.itertuples():
        assert row.value == pytest.approx(expected[row.step][row.layer, row.head].item(), rel=1e-5)


class ThreadProbe(Probe):
    """Records which thread measured it; `fail` makes it raise instead."""

    name = "thread_probe"
    off_thread = True

    def __init__(self, off_thread: bool = True, fail: bool = False):
        super().__init__()
        self.off_thread, self.fail, self.threads = off_thread, fail, []

    def hook_names(self, adapter) -> list[str]:
        return ["blocks.0.hook_resid_pre"]

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise ValueError("this probe always fails")
        return [Measurement("norm", inputs.acts["blocks.0.hook_resid_pre"].norm())]


def test_background_telemetry_measures_activation_probes_on_its_thread_and_model_readers_in_the_step():
    model = build_model(ModelConfig(n_layers=1, n_heads=2, d_model=16, d_vocab=11, n_ctx=8))
    aside, inline = ThreadProbe(off_thread=True), ThreadProbe(off_thread=False)
    inline.name = "thread_probe_inline"
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    with Telemetry(model, probes=[aside, inline], store=None, background=True) as telemetry:
        for step in range(3):
            with telemetry.step(step, tokens):
                model(tokens)
        frame = telemetry.dataframe()
    assert set(aside.threads) == {"phaselens-telemetry"} and len(aside.threads) == 3
    assert set(inline.threads) == {threading.current_thread().name} and len(inline.threads) == 3
    assert sorted(frame.step) == [0, 0, 1, 1, 2, 2]


def test_an_error_in_background_telemetry_is_raised_in_the_training_thread():
    model = build_model(ModelConfig(n_layers=1, n_heads=2, d_model=16, d_vocab=11, n_ctx=8))
    telemetry = Telemetry(model, probes=[ThreadProbe(fail=True)], store=None, background=True)
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    with telemetry.step(0, tokens):
        model(tokens)
    with pytest.raises(RuntimeError, match="live telemetry failed: ValueError: this probe always fails"):
        telemetry.flush()
    telemetry.close()  # the error was reported once; closing still removes the hooks
    assert not model.blocks[0].hook_resid_pre.fwd_hooks
