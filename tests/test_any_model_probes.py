"""Every applicable probe on tiny GPT-2, GPT-NeoX and Llama models, read only through the model adapter."""

from __future__ import annotations

import math

import pytest
import torch

from phaselens.models.adapter import adapter_for
from phaselens.probes.base import make_probe
from phaselens.probes.heads import detection_patterns, head_score
from phaselens.probes.loss import icl_score, token_losses
from phaselens.probes.measure import measure_batches
from phaselens.probes.patching import patching_effects, target_probability
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.induction import induction_probe_batch
from phaselens.tasks.induction_config import INDUCTION_BATCH_OPTIONS

ARCHITECTURES = ("gpt2", "gpt_neox", "llama")
PROBES = ("attention", "heads", "loss", "logit_lens", "geometry", "attention_to", "patching", "neurons")


@pytest.fixture(scope="module")
def bridges(tiny_hf_models):
    from transformer_lens.model_bridge import TransformerBridge

    return {name: TransformerBridge.boot_transformers(str(path), device="cpu").eval() for name, path in tiny_hf_models.items()}


def batches_for(adapter) -> dict[str, TaskBatch]:
    """A text batch (the tokenizer's words) and the induction batch in the model's vocabulary, 60 tokens each."""
    words = adapter.tokenizer.encode("the cat sat on the mat while the dog ran far away from the old red barn " * 5)
    text = torch.tensor([words[i:i + 60] for i in (0, 3, 7)])  # (3, 60)
    induction = induction_probe_batch(adapter.tokenizer.ordinary_ids(), 60, 4, torch.Generator().manual_seed(0))
    return {"probe": TaskBatch.coerce(text), "induction": induction}


def test_icl_score_is_the_loss_of_token_500_minus_token_50_clipped_to_the_context():
    losses = torch.arange(2 * 600, dtype=torch.float32).view(2, 600) / 100  # token k's loss is losses[:, k-1]
    mask = torch.ones(2, 600, dtype=torch.bool)
    assert icl_score(losses, mask).item() == pytest.approx(((4.99 + 10.99) - (0.49 + 6.49)) / 2)
    short = losses[:, :99]  # a context of 100 tokens: token 99 stands in for 500
    assert icl_score(short, mask[:, :99]).item() == pytest.approx(0.98 - 0.49)
    assert icl_score(losses[:, :40], mask[:, :40]) is None  # no token 50 after token 40: nothing to compare
    mask[0] = False  # masked-out rows do not count
    assert icl_score(losses, mask).item() == pytest.approx(10.99 - 6.49)


def test_induction_probe_batch_draws_ordinary_ids_and_repeats_a_segment(bridges):
    adapter = adapter_for(bridges["gpt_neox"])
    ids = adapter.tokenizer.ordinary_ids()
    assert ids and not set(ids) & adapter.tokenizer.special_ids and max(ids) < adapter.tokenizer.n_tokens
    batch = induction_probe_batch(ids, 48, 16, torch.Generator().manual_seed(1))
    assert set(batch.tokens.unique().tolist()) <= set(ids)
    rows, cols = batch.positions["copy"].nonzero(as_tuple=True)
    # a copy prediction's next token was seen after an earlier occurrence of the current token
    assert detection_patterns(batch.tokens)["induction"][rows, cols].any(-1).all()
    starts = {int(r.nonzero()[0, 0]) for r in batch.positions["copy"]}
    assert len(starts) > 3  # a variable offset


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_probe_measures_a_hugging_face_model(bridges, name):
    adapter = adapter_for(bridges[name])
    batches = batches_for(adapter)
    options = {**INDUCTION_BATCH_OPTIONS, "loss": {"icl_score": True}, "geometry": {"unigram": torch.ones(adapter.d_vocab)}}
    probes = [make_probe(p, **options.get(p, {})) for p in PROBES]  # as the imported series' study declares them
    routes = {p.name: p.needs.batch for p in probes}  # as an imported series' plan routes them: heads and friends to the induction batch
    results = dict(measure_batches(adapter, batches, probes, routes))
    assert set(results) == set(PROBES)
    shapes = {(p, m.metric): tuple(m.value.shape) for p, ms in results.items() for m in ms}
    L, H = adapter.n_layers, adapter.n_heads
    assert shapes[("heads", "induction")] == (L, H) and shapes[("attention_to", "mass")] == (L, H)
    assert shapes[("logit_lens", "p_correct")] == (L + 1,) and shapes[("patching", "effect")] == (L + 1,)
    assert shapes[("geometry", "interaction_energy")] == (L + 2,) and shapes[("attention", "entropy")] == (L, H)
    assert shapes[("neurons", "firing_rate_mean")] == (L,)  # the MLP neurons (blocks.{l}.mlp.hook_post)
    assert all(torch.isfinite(m.value).all() for ms in results.values() for m in ms)

    text = batches["probe"].tokens
    with torch.no_grad():
        logits = adapter.logits(text)
    losses = token_losses(logits, text)  # (B, T-1)
    measured = {m.metric: m.value for m in results["loss"]}
    torch.testing.assert_close(measured["all"], losses.mean())
    torch.testing.assert_close(measured["icl_score"], losses[:, 58].mean() - losses[:, 49].mean())  # tokens 59 and 50
    # the logit lens of the last stream is the model's own prediction
    lens = {m.metric: m.value for m in results["logit_lens"]}
    torch.testing.assert_close(lens["p_correct"][-1], target_probability(logits, text).mean())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_head_scores_equal_a_direct_computation_from_the_models_own_attentions(bridges, tiny_hf_models, name):
    from transformers import AutoModelForCausalLM

    adapter = adapter_for(bridges[name])
    batch = batches_for(adapter)["induction"]
    (_, scores), = measure_batches(adapter, {"probe": batch}, [make_probe("heads")], {"heads": "probe"})
    reference = AutoModelForCausalLM.from_pretrained(tiny_hf_models[name], attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = reference(batch.tokens, output_attentions=True).attentions  # L x (B, H, T, T)
    D = detection_patterns(batch.tokens)
    for m in scores:
        direct = torch.stack([head_score(a, D[m.metric]) for a in attentions])  # (L, H)
        torch.testing.assert_close(m.value, direct, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_patching_every_position_restores_the_clean_prediction_on_a_hugging_face_model(bridges, name):
    """The hook path (no fast paths on a bridge): a full patch at any residual stream gives the clean run."""
    adapter = adapter_for(bridges[name])
    batch = batches_for(adapter)["induction"]
    clean, corrupted = batch.tokens, batch.tokens.flip(-1)
    names = [site.hook for site in adapter.residual_sites]
    with torch.no_grad():
        clean_logits, cache = adapter.run_with_cache(clean, names)
        everywhere = torch.ones_like(clean, dtype=torch.bool)
        targets = batch.positions["copy"]
        effects = patching_effects(adapter, cache, corrupted, clean, everywhere, targets)  # (L+1, B)
        p = lambda logits: (target_probability(logits, clean) * targets).sum(-1) / targets.sum(-1)  # noqa: E731
        expected = p(clean_logits) - p(adapter.logits(corrupted))
    assert effects.shape == (adapter.n_layers + 1, len(clean))
    for layer_effect in effects:
        torch.testing.assert_close(layer_effect, expected, atol=1e-5, rtol=1e-4)
    assert not math.isclose(float(expected.abs().max()), 0.0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_activations_alone_stop_the_forward_after_the_last_hook_point_read(bridges, name):
    """A batch whose probes read no logits (head scores) runs no final norm or unembedding, and gets the same patterns."""
    adapter = adapter_for(bridges[name])
    tokens = batches_for(adapter)["induction"].tokens
    names = [adapter.pattern_hook(layer) for layer in range(adapter.n_layers)]
    final_norm_calls = []
    final_norm = adapter.hook_points[adapter.final_norm_site.hook]
    final_norm.add_hook(lambda act, hook: final_norm_calls.append(1))
    try:
        with torch.no_grad():
            stopped = adapter.activations(tokens, names)
            assert not final_norm_calls  # the forward ended at the last layer's pattern
            _, full = adapter.run_with_cache(tokens, names)
            assert final_norm_calls
    finally:
        final_norm.remove_hooks()
    for hook in names:
        assert torch.equal(stopped[hook], full[hook])
    assert not any(point.fwd_hooks for point in adapter.hook_points.values())  # no hook left behind


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logit_lens_of_the_embeddings_unembeds_each_distinct_token_once_where_positions_add_nothing(bridges, name):
    """GPT-NeoX and Llama (rotary) embed a token the same at every position; GPT-2 adds learned positions.
    Either way the lens equals p(target), top-1 and entropy read off every prediction's own row."""
    from phaselens.probes.logit_lens import logit_lens_stats, rows_by_token

    adapter = adapter_for(bridges[name])
    tokens = batches_for(adapter)["probe"].tokens  # (3, 60) of repeated words
    streams = [site.hook for site in adapter.residual_sites]
    with torch.no_grad():
        logits, cache = adapter.run_with_cache(tokens, streams)
        embeddings = cache[streams[0]][:, :-1].flatten(0, 1)  # (N, d_model)
        by_token = rows_by_token(embeddings, tokens[:, :-1].flatten())
        assert (by_token is None) == (name == "gpt2")
        if by_token is not None:
            assert len(by_token[0]) == len(tokens[:, :-1].unique())
        measured = logit_lens_stats([cache[s] for s in streams], adapter, tokens, torch.ones(3, 59, dtype=torch.bool), logits)
        target = tokens[:, 1:].flatten()
        for layer, stream in enumerate(streams):
            row_logits = adapter.logits_from(cache[stream][:, :-1].flatten(0, 1)).log_softmax(-1)  # (N, V)
            correct = row_logits[torch.arange(len(target)), target]
            expected = [correct.exp().mean(), (correct >= row_logits.amax(-1)).float().mean(),
                        -(row_logits.exp() * row_logits).sum(-1).mean()]
            got = [measured[metric][layer] for metric in ("p_correct", "top1", "entropy")]
            torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-5, rtol=1e-5)
