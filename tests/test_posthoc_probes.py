"""Post-hoc probes (`logit_lens`, `attention_to`, `patching`) against the definitions in PRODUCT.md.

Formula tests use hand-built inputs whose expected values are written out below; model tests
use a real (tiny) phaselens model and compare with plain forward passes; the last tests train
the induction preset briefly and sweep its checkpoints with `run_probes`.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from phaselens.errors import ConfigError
from phaselens.models import ModelConfig, build_model
from phaselens.models.adapter import adapter_for
from phaselens.models.sites import residual_sites
from phaselens.models.transformer import Transformer
from phaselens.posthoc.runner import run_probes
from phaselens.probes.attention_to import AttentionToProbe, attention_mass, position_mask
from phaselens.probes.base import ProbeInputs
from phaselens.probes.logit_lens import LogitLensProbe, lens_positions, logit_lens_stats
from phaselens.probes.measure import measure_cache, measure_model
from phaselens.probes.patching import PatchingProbe, _patching_effects_batched, corrupt_positions, patching_effects
from phaselens.run import open_run
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.induction import InductionTask
from phaselens.training.config import load_config
from phaselens.training.trainer import train


def site_hooks(n_layers: int) -> list[str]:
    """The hook of each residual stream 0..n_layers."""
    return [site.hook for site in residual_sites(n_layers)]


def h(*probs: float) -> float:
    """Shannon entropy in nats, written out by hand."""
    return -sum(p * math.log(p) for p in probs if p > 0)


LN3, LN9 = math.log(3), math.log(9)


# ---------------------------------------------------------------------------- logit lens


def lens_model() -> Transformer:
    """No final norm; the unembedding reads the first two of three dimensions as the logits of tokens 0 and 1."""
    model = Transformer(ModelConfig(n_layers=1, n_heads=1, d_model=3, d_vocab=2, normalization="none"))
    with torch.no_grad():
        model.W_U.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))  # (d_model=3, vocab=2)
    return model


def lens_resid() -> torch.Tensor:
    """(L+1=2, B=2, T=3, d_model=3) streams; the third dimension is noise the unembedding ignores.

    Layer 0 gives logits [ln 3, 0] (p = 3/4, 1/4) everywhere. Layer 1 gives
    seq 0: [0, ln 3], [ln 3, 0]; seq 1: [0, 0], [ln 9, 0] (p = 9/10, 1/10).
    The last position of each sequence predicts nothing: huge logits there must not count.
    """
    last = [50.0, -50.0, 7.0]
    layer0 = [[[LN3, 0.0, 5.0], [LN3, 0.0, -2.0], last], [[LN3, 0.0, 1.0], [LN3, 0.0, 3.0], last]]
    layer1 = [[[0.0, LN3, 4.0], [LN3, 0.0, 9.0], last], [[0.0, 0.0, -6.0], [LN9, 0.0, 2.0], last]]
    return torch.tensor([layer0, layer1])


LENS_TOKENS = torch.tensor([[0, 0, 1], [1, 1, 0]])  # targets: seq 0 -> 0, 1; seq 1 -> 1, 0
LENS_MASK = torch.tensor([[True, True], [False, True]])  # (B, T-1): three predictions count


def test_logit_lens_stats_average_p_correct_top1_and_entropy_over_masked_predictions():
    stats = logit_lens_stats(lens_resid(), lens_model(), LENS_TOKENS, LENS_MASK)
    # layer 0: p(target) = 3/4, 1/4, 3/4; argmax is token 0, right for targets 0 (two of three)
    # layer 1: p(target) = 1/4, 1/4, 9/10; argmax 1, 0, 0 against targets 0, 1, 0: only the last is right
    assert stats["p_correct"].tolist() == pytest.approx([7 / 12, 7 / 15], abs=1e-6)
    assert stats["top1"].tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    assert stats["entropy"].tolist() == pytest.approx([h(0.75, 0.25), (2 * h(0.75, 0.25) + h(0.9, 0.1)) / 3], abs=1e-6)


def test_lens_positions_first_token_only_keeps_the_first_masked_prediction_of_each_sequence():
    tokens = torch.zeros(3, 5, dtype=torch.long)
    loss_mask = torch.tensor([[False, True, True, True], [True, True, True, True], [True, True, True, True]])
    copy_mask = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, True, False]])
    batch = TaskBatch(tokens=tokens, loss_mask=loss_mask, positions={"copy": copy_mask})
    F, T = False, True
    assert lens_positions(batch, "loss", False).tolist() == loss_mask.tolist()
    assert lens_positions(batch, "loss", True).tolist() == [[F, T, F, F], [T, F, F, F], [T, F, F, F]]
    assert lens_positions(batch, "copy", False).tolist() == [[F, F, T, T], [F, F, F, F], [F, T, T, F]]
    # a sequence without copies stays empty rather than gaining position 0
    assert lens_positions(batch, "copy", True).tolist() == [[F, F, T, F], [F, F, F, F], [F, T, F, F]]


def test_logit_lens_first_token_only_reads_one_prediction_per_sequence():
    batch = TaskBatch(tokens=LENS_TOKENS, loss_mask=LENS_MASK)
    mask = lens_positions(batch, "loss", first_token_only=True)  # seq 0: position 0; seq 1: position 1
    stats = logit_lens_stats(lens_resid(), lens_model(), LENS_TOKENS, mask)
    assert stats["p_correct"].tolist() == pytest.approx([(3 / 4 + 3 / 4) / 2, (1 / 4 + 9 / 10) / 2], abs=1e-6)
    assert stats["top1"].tolist() == pytest.approx([1.0, 0.5], abs=1e-6)


def test_logit_lens_names_the_position_set_a_batch_lacks():
    with pytest.raises(ValueError, match="position set 'copy'.*they have: none"):
        lens_positions(TaskBatch(tokens=LENS_TOKENS, loss_mask=LENS_MASK), "copy", False)


def tiny_model(seed: int = 0) -> Transformer:
    """A real 2-layer model with large random weights, so its predictions are far from uniform."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=11, n_ctx=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("W_"):
                p.normal_(std=0.5)
    return model.eval()


def next_token_probability(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p(tokens[t+1]) from logits[t]: (B, T, V), (B, T) -> (B, T-1), written out with plain torch."""
    probs = torch.softmax(logits[:, :-1].double(), dim=-1)  # (B, T-1, V)
    return torch.gather(probs, 2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def test_logit_lens_layer_0_is_the_embeddings_and_the_last_layer_is_the_models_prediction():
    model = tiny_model()
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    batch = TaskBatch(tokens=tokens, loss_mask=torch.ones(3, 7, dtype=torch.bool))
    probe = LogitLensProbe()
    assert probe.hook_names(adapter_for(model)) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        embeddings = model.W_E[tokens] + model.W_pos[:8]  # (B, T, d_model): what block 0 receives
        lens_0 = model.unembed(model.ln_final(embeddings))
    frame = measure_cache(cache, batch, [probe], model=model)
    p_correct = frame[frame["metric"] == "p_correct"].sort_values("layer")
    assert p_correct["layer"].tolist() == [0, 1, 2]
    values = p_correct["value"].tolist()
    assert values[0] == pytest.approx(next_token_probability(lens_0, tokens).mean().item(), abs=1e-5)
    assert values[2] == pytest.approx(next_token_probability(logits, tokens).mean().item(), abs=1e-5)
    assert abs(values[2] - values[0]) > 1e-3, "the blocks change the prediction, so layer 0 and layer 2 must differ"


# ---------------------------------------------------------------------------- attention_to


def attention_batch() -> TaskBatch:
    """Two sequences of T = 3 with a copy mask over predictions (B, T-1) and a source mask (B, T)."""
    return TaskBatch(
        tokens=torch.zeros(2, 3, dtype=torch.long),
        loss_mask=torch.ones(2, 2, dtype=torch.bool),
        positions={"copy": torch.tensor([[True, False], [False, True]]),
                   "source": torch.tensor([[True, True, False], [False, False, True]])},
    )


HEAD_0 = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]
HEAD_1 = [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]


def two_sequence_pattern() -> torch.Tensor:
    return torch.tensor([[HEAD_0, HEAD_1], [HEAD_0, HEAD_1]])  # (B=2, H=2, Q=3, K=3)


def test_attention_mass_is_the_mean_over_selected_queries_of_the_attention_on_selected_keys():
    queries = torch.tensor([[False, True, True], [True, False, False]])  # three queries in all
    keys = torch.tensor([[True, True, False], [False, False, True]])
    # head 0: q1 -> 0.5 + 0.5, q2 -> 0.2 + 0.3, seq 1 q0 -> key 2: 0.0   => (1.0 + 0.5 + 0.0) / 3
    # head 1: q1 -> 0.9 + 0.1, q2 -> 0.0 + 0.0, seq 1 q0 -> key 2: 0.0   => (1.0 + 0.0 + 0.0) / 3
    mass = attention_mass(two_sequence_pattern(), queries, keys)
    assert mass.tolist() == pytest.approx([0.5, 1 / 3], abs=1e-6)
    swapped = two_sequence_pattern()[:, [1, 0]]
    per_layer = attention_mass(torch.stack([two_sequence_pattern(), swapped]), queries, keys)  # (L=2, H=2)
    assert per_layer.tolist() == [pytest.approx([0.5, 1 / 3], abs=1e-6), pytest.approx([1 / 3, 0.5], abs=1e-6)]


def test_position_mask_pads_prediction_masks_and_takes_explicit_positions():
    batch = attention_batch()
    # copy is a set of predictions (B, T-1): prediction t is made at query t, the last token predicts nothing
    assert position_mask(batch, "copy", "query").tolist() == [[True, False, False], [False, True, False]]
    assert position_mask(batch, "source", "key").tolist() == [[True, True, False], [False, False, True]]
    assert position_mask(batch, [0, 2], "key").tolist() == [[True, False, True], [True, False, True]]
    with pytest.raises(ValueError, match="position set .bogus.*they have: copy, source"):
        position_mask(batch, "bogus", "key")


def test_attention_to_probe_reads_masks_by_name_and_explicit_positions():
    batch = attention_batch()
    acts = {"blocks.0.attn.hook_pattern": two_sequence_pattern()}
    inputs = lambda b: ProbeInputs(acts=acts, batch=b, model=None, n_layers=1, n_heads=2)
    # copy -> source: seq 0 query 0 on keys {0, 1}: 1.0 (both heads); seq 1 query 1 on key 2: 0.0
    (by_name,) = AttentionToProbe(query="copy", key="source").compute(inputs(batch))
    assert by_name.metric == "mass"
    assert by_name.value.tolist() == [pytest.approx([0.5, 0.5], abs=1e-6)]
    # query 2 on key 0: head 0 puts 0.2 there, head 1 nothing, in both sequences
    (explicit,) = AttentionToProbe(query=[2], key=[0]).compute(inputs(batch))
    assert explicit.value.tolist() == [pytest.approx([0.2, 0.0], abs=1e-6)]
    plain = TaskBatch(tokens=batch.tokens, loss_mask=batch.loss_mask)
    with pytest.raises(ValueError, match="position set 'copy'"):  # a task without segments: named, not guessed
        AttentionToProbe(query="copy", key="source").compute(inputs(plain))
    with pytest.raises(ValueError, match="needs options query and key"):
        AttentionToProbe().compute(inputs(batch))


# ---------------------------------------------------------------------------- patching


def clean_and_corrupted() -> tuple[torch.Tensor, torch.Tensor]:
    """Three clean sequences, and the same with tokens 3 and 4 changed."""
    clean = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(2))
    corrupted = clean.clone()
    corrupted[:, 3:5] = (clean[:, 3:5] + 1) % 11
    return clean, corrupted


def positions(*where: int, length: int = 8) -> torch.Tensor:
    mask = torch.zeros(3, length, dtype=torch.bool)
    mask[:, list(where)] = True
    return mask


def effects_of(model, clean, corrupted, patched: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=site_hooks(2))
        streams = {name: cache[name] for name in site_hooks(2)}
        return patching_effects(model, streams, corrupted, clean, patched, targets)  # (L+1, B)


def test_patching_hooks_are_the_residual_streams_embeddings_then_each_block_output():
    assert site_hooks(2) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert PatchingProbe().hook_names(adapter_for(tiny_model())) == site_hooks(2)


def test_patching_every_position_restores_the_clean_prediction_at_every_layer():
    model = tiny_model()
    clean, corrupted = clean_and_corrupted()
    targets = torch.ones(3, 7, dtype=torch.bool)
    effects = effects_of(model, clean, corrupted, positions(*range(8)), targets)
    with torch.no_grad():
        p_clean = next_token_probability(model(clean), clean).mean(-1)  # (B,)
        p_corrupted = next_token_probability(model(corrupted), clean).mean(-1)
    expected = (p_clean - p_corrupted).float()
    assert expected.abs().max() > 1e-2, "the corruption must change the prediction for this test to mean anything"
    assert effects.shape == (3, 3)
    for layer in range(3):
        torch.testing.assert_close(effects[layer], expected, atol=1e-5, rtol=0)


def test_patching_positions_identical_in_both_inputs_has_no_effect():
    model = tiny_model()
    clean, corrupted = clean_and_corrupted()
    targets = torch.ones(3, 7, dtype=torch.bool)
    # before the first changed token every residual stream is the same in both runs (causal attention)
    before = effects_of(model, clean, corrupted, positions(0, 1, 2), targets)
    torch.testing.assert_close(before, torch.zeros(3, 3), atol=1e-6, rtol=0)
    # after it, only the embeddings (layer 0) are the same: block 0 has already read the changed tokens
    after = effects_of(model, clean, corrupted, positions(5, 6, 7), targets)
    torch.testing.assert_close(after[0], torch.zeros(3), atol=1e-6, rtol=0)
    assert after[1].abs().max() > 1e-4


def test_patching_the_last_layer_changes_only_the_predictions_made_at_the_patched_positions():
    model = tiny_model()
    clean, corrupted = clean_and_corrupted()
    elsewhere = torch.ones(3, 7, dtype=torch.bool)
    elsewhere[:, 3:5] = False
    effects = effects_of(model, clean, corrupted, positions(3, 4), elsewhere)
    assert effects[2].abs().max() < 1e-6  # resid_post of the last block feeds only its own position's logits
    assert effects[0].abs().max() > 1e-3  # the embeddings feed every later prediction
    at_patch = ~elsewhere
    effects = effects_of(model, clean, corrupted, positions(3, 4), at_patch)
    with torch.no_grad():
        p_clean = next_token_probability(model(clean), clean)[:, 3:5].mean(-1)
        p_corrupted = next_token_probability(model(corrupted), clean)[:, 3:5].mean(-1)
    torch.testing.assert_close(effects[2], (p_clean - p_corrupted).float(), atol=1e-5, rtol=0)


def induction_batch() -> TaskBatch:
    return InductionTask(seq_len=64, vocab=64).sample(8, torch.Generator().manual_seed(3))


def test_corrupt_positions_changes_only_source_positions_and_is_deterministic_per_seed():
    batch = induction_batch()
    source = batch.positions["source"]
    corrupted = corrupt_positions(batch.tokens, source, vocab=64, seed=0)
    assert source.sum(-1).min() >= 8  # every sequence has a segment of at least min_len tokens
    assert torch.equal(corrupted[~source], batch.tokens[~source])
    changed = (corrupted != batch.tokens)[source].float().mean().item()
    assert changed > 0.9  # a random token equals the old one with probability 1/64
    assert torch.equal(corrupt_positions(batch.tokens, source, vocab=64, seed=0), corrupted)
    assert not torch.equal(corrupt_positions(batch.tokens, source, vocab=64, seed=1), corrupted)
    assert corrupted.min() >= 0 and corrupted.max() < 64


def explicit_patching_effects(model, clean_tokens, corrupted, positions, targets) -> torch.Tensor:
    """e_ℓ by the definition: one full hooked forward of the corrupted input per patched stream."""
    weights = targets.double()

    def mean_p(logits):
        return (next_token_probability(logits, clean_tokens) * weights).sum(-1) / weights.sum(-1)

    with torch.no_grad():
        _, cache = model.run_with_cache(clean_tokens, names_filter=site_hooks(model.cfg.n_layers))
        baseline = mean_p(model(corrupted))
        effects = []
        for name in site_hooks(model.cfg.n_layers):
            patch = lambda act, hook, name=name: torch.where(positions[..., None], cache[name], act)
            effects.append(mean_p(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])) - baseline)
    return torch.stack(effects).float()


@pytest.mark.parametrize("shortcut", [True, False], ids=["embedding-patch-is-clean", "general"])
def test_patching_reusing_the_corrupted_prefix_equals_one_hooked_forward_per_layer(shortcut):
    model = build_model(ModelConfig(n_layers=3, n_heads=2, d_model=16, d_vocab=64, n_ctx=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("W_"):
                p.normal_(std=0.4, generator=torch.Generator().manual_seed(len(name)))
    batch = induction_batch()
    corrupted = corrupt_positions(batch.tokens, batch.positions["source"], 64, seed=0)
    positions = batch.positions["source"]
    if not shortcut:  # patch only part of the corruption: the patched embeddings are not the clean input
        positions = positions & (positions.cumsum(-1) > 2)
    targets = batch.predictions("copy")
    expected = explicit_patching_effects(model, batch.tokens, corrupted, positions, targets)
    assert expected.abs().max() > 1e-3, "the corruption must matter for this test to mean anything"
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens, names_filter=site_hooks(3))
        streams = {name: cache[name] for name in site_hooks(3)}
        fast = patching_effects(model, streams, corrupted, batch.tokens, positions, targets, clean_logits=logits)
        without_logits = patching_effects(model, streams, corrupted, batch.tokens, positions, targets)
        batched = _patching_effects_batched(adapter_for(model), streams, corrupted, positions,
                                            lambda lg: _read_targets(lg, batch.tokens, targets))
    for effects in (fast, without_logits, batched):
        torch.testing.assert_close(effects, expected, atol=1e-5, rtol=0)


def _read_targets(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean p(target) per pair from (groups, B, T, V) logits, written out with plain torch."""
    weights = targets.double()
    return torch.stack([(next_token_probability(group, tokens) * weights).sum(-1) / weights.sum(-1) for group in logits]).float()


def test_patching_probe_names_what_a_batch_without_source_positions_lacks():
    model = tiny_model()
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(4))
    plain = TaskBatch(tokens=tokens, loss_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="position set 'source'"):
        measure_model(model, plain, [PatchingProbe(patch="source", read="copy")])
    with pytest.raises(ValueError, match="needs options patch"):
        measure_model(model, plain, [PatchingProbe()])


# ---------------------------------------------------------------------------- sweep over a real run

STEPS = [0, 50, 100, 150]


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("posthoc") / "run"
    train(load_config("induction", ["train.steps=150", "train.checkpoint_every=50"]), path, progress=False)
    result = run_probes(path, probes=["logit_lens", "attention_to", "patching"], progress=False)
    assert result.ok, result.failures
    return open_run(path)


def _keys(frame) -> set[tuple]:
    """(step, layer, head) of each row, None where the metric is not per layer / head."""
    as_int = lambda value: None if pd.isna(value) else int(value)
    return {(int(step), as_int(layer), as_int(head)) for step, layer, head in zip(frame["step"], frame["layer"], frame["head"])}


def test_sweep_stores_logit_lens_p_correct_per_layer_at_every_checkpoint(probed_run):
    rows = probed_run.metrics(probe="logit_lens", metric="p_correct", source="checkpoint")
    assert _keys(rows) == {(step, layer, None) for step in STEPS for layer in range(3)}
    assert rows["value"].between(0, 1).all()
    for metric in ("top1", "entropy"):
        assert len(probed_run.metrics(probe="logit_lens", metric=metric, source="checkpoint")) == len(STEPS) * 3


def test_sweep_logit_lens_last_layer_agrees_with_the_checkpoint_loss(probed_run):
    # Jensen: the mean of p = exp(−CE) over positions is at least exp(−mean CE)
    lens = probed_run.metrics(probe="logit_lens", metric="p_correct", source="checkpoint", layer=2)
    loss = probed_run.metrics(probe="loss", metric="all", source="checkpoint")
    assert len(loss) == len(STEPS)
    for step, ce in zip(loss["step"], loss["value"]):
        p = float(lens[lens["step"] == step]["value"].iloc[0])
        assert math.exp(-ce) <= p + 1e-6 <= 1


def test_sweep_stores_attention_to_mass_per_layer_and_head_at_every_checkpoint(probed_run):
    rows = probed_run.metrics(probe="attention_to", metric="mass", source="checkpoint")
    assert _keys(rows) == {(step, layer, head) for step in STEPS for layer in range(2) for head in range(2)}
    assert rows["value"].between(0, 1).all()


def test_sweep_stores_patching_effect_per_layer_and_z_dependence_at_every_checkpoint(probed_run):
    effect = probed_run.metrics(probe="patching", metric="effect", source="checkpoint")
    z = probed_run.metrics(probe="patching", metric="z_dependence", source="checkpoint")
    assert _keys(effect) == {(step, layer, None) for step in STEPS for layer in range(3)}
    assert _keys(z) == {(step, None, None) for step in STEPS}
    assert effect["value"].between(-1, 1).all() and z["value"].between(-1, 1).all()
    for step in STEPS:
        # the mean over pairs of each pair's best layer is at least the best layer of the mean
        best_mean = effect[effect["step"] == step]["value"].max()
        assert float(z[z["step"] == step]["value"].iloc[0]) >= best_mean - 1e-6


@pytest.mark.parametrize("probe", ["logit_lens", "attention_to", "patching"])
def test_post_hoc_probes_are_refused_as_live_telemetry(probe):
    with pytest.raises(ConfigError, match="checkpoints only"):
        load_config("induction", [f"telemetry.probes={probe}"])
