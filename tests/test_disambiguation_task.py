"""The late-disambiguation task family and its probes, on hand-checked batches and a tiny real model."""

from __future__ import annotations


import pytest
import torch

from phaselens.errors import ConfigError
from phaselens.models import build_model
from phaselens.models.transformer import Transformer  # noqa: F401  (TransformerLens loads slowly: pay it at collection)
from phaselens.probes.base import ProbeInputs
from phaselens.probes.loss import LossProbe
from phaselens.probes.measure import measure_model
from phaselens.probes.patching import PatchingProbe, target_probability
from phaselens.probes.random_z import RandomZProbe
from phaselens.probes.attention_to import AttentionToProbe
from phaselens.probes.logit_lens import LogitLensProbe
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.disambiguation_config import BOS, EOS, SELECTOR_STUDY, SEP
from phaselens.training.config import load_config

SMALL = ["data.k=4", "data.n_unique_b=12", "model.n_layers=1", "model.d_model=32", "model.d_head=8", "model.d_mlp=64"]


def task_of(*overrides: str):
    return load_config("disamb_small", [*SMALL, *overrides]).build_task()


def test_bz_to_a_sequences_are_bos_b_sep_z_sep_a_eos_with_loss_only_on_a_and_eos():
    task = task_of()
    batch = task.sample(8, torch.Generator().manual_seed(0))
    tokens = batch.tokens
    assert tokens.shape == (8, 16)
    assert (tokens[:, 0] == BOS).all() and (tokens[:, 7] == SEP).all() and (tokens[:, 10] == SEP).all()
    assert (tokens[:, 15] == EOS).all()
    assert (tokens[:, 1:7] < 36).all() and (tokens[:, 8:10] < 36).all() and (tokens[:, 11:15] < 36).all()
    # prediction t reads token t+1: A sits at 11..14 and EOS at 15, so predictions 10..14 count
    assert batch.loss_mask[0].nonzero().flatten().tolist() == [10, 11, 12, 13, 14]
    assert batch.positions["first_target"][0].nonzero().flatten().tolist() == [10]
    assert batch.positions["z"][0].nonzero().flatten().tolist() == [8, 9]


def test_dataset_is_drawn_once_from_the_seed_with_k_shared_selectors_and_distinct_first_characters():
    a, b = task_of(), task_of()
    assert torch.equal(a.targets, b.targets) and torch.equal(a.bases, b.bases) and torch.equal(a.selectors, b.selectors)
    assert not torch.equal(task_of("data.seed=1").targets, a.targets)
    first = a.targets[:, 0].view(12, 4)  # (bases, K)
    assert all(len(set(row.tolist())) == 4 for row in first)
    assert len({tuple(t) for t in a.targets.tolist()}) == 48  # every target string is distinct
    # every sequence of one base with selector j ends in that base's j-th target, whatever the split
    batch = a.sample(64, torch.Generator().manual_seed(3))
    for row in batch.tokens:
        base = [i for i, b_ in enumerate(a.bases.tolist()) if b_ == row[1:7].tolist()][0]
        j = a.selectors.tolist().index(row[8:10].tolist())
        assert row[11:15].tolist() == a.targets[base * 4 + j].tolist()


def test_shared_first_chars_gives_every_base_the_same_k_first_characters_in_its_own_order():
    task = task_of("data.shared_first_chars=true")
    first = task.targets[:, 0].view(12, 4)
    assert {frozenset(row.tolist()) for row in first} == {frozenset(first[0].tolist())}
    assert len({tuple(row.tolist()) for row in first}) > 1


def test_reversed_and_selector_free_variants_change_the_layout():
    b_to_a = task_of("data.task=b_to_a").sample(4, torch.Generator().manual_seed(0))
    assert b_to_a.tokens.shape == (4, 13) and "z" not in b_to_a.positions
    assert b_to_a.positions["first_target"][0].nonzero().flatten().tolist() == [7]
    az = task_of("data.task=az_to_b")
    batch = az.sample(4, torch.Generator().manual_seed(0))
    assert batch.tokens.shape == (4, 16)
    assert batch.loss_mask[0].nonzero().flatten().tolist() == list(range(8, 15))  # B (6 tokens) and EOS
    assert batch.tokens[0, 1:5].tolist() in az.targets.tolist()  # the input is a target string


def test_probe_split_pairs_rows_with_the_same_base_and_different_z_and_first_target():
    batch = task_of().sample(10, torch.Generator().manual_seed(1), split="probe")
    assert batch.pair_index.tolist() == [1, 0, 3, 2, 5, 4, 7, 6, 9, 8]
    for one, two in zip(range(0, 10, 2), range(1, 10, 2)):
        assert torch.equal(batch.tokens[one, 1:7], batch.tokens[two, 1:7])  # same B
        assert not torch.equal(batch.tokens[one, 8:10], batch.tokens[two, 8:10])  # different z
        assert batch.tokens[one, 11] != batch.tokens[two, 11]  # different first target
    assert batch.rows(slice(1, 4)).pair_index.tolist() == [-1, 2, 1]  # a partner outside the rows is dropped


def test_split_by_base_holds_out_whole_bases_for_eval_and_probe():
    task = task_of("data.probe_fraction=0.25", "data.split_by_base=true")
    train_bases = set((task.train_pool // 4).tolist())
    held_bases = set((task.held_pool // 4).tolist())
    assert len(held_bases) == 3 and not train_bases & held_bases
    probe = task.sample(8, torch.Generator().manual_seed(0), split="probe")
    bases = task.bases.tolist()
    assert all(bases.index(row[1:7].tolist()) in held_bases for row in probe.tokens)


@pytest.mark.parametrize("override, key", [
    ("model.d_vocab=39", "model.d_vocab"),
    ("model.n_ctx=15", "model.n_ctx"),
    ("data.k=0", "data.k"),
    ("data.k=37", "data.k"),
    ("data.probe_fraction=1.0", "data.probe_fraction"),
])
def test_impossible_disambiguation_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("disamb_small", [*SMALL, override])


def test_b_to_a_fits_a_shorter_context():
    assert load_config("disamb_small", [*SMALL, "data.task=b_to_a", "model.n_ctx=13"]).build_task().sample(
        2, torch.Generator()).tokens.shape == (2, 13)


# ---------------------------------------------------------------------------- probes on a tiny model


def tiny():
    config = load_config("disamb_small", SMALL)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    probe = config.build_task().sample(16, torch.Generator().manual_seed(5), split="probe")
    return model, probe


def first_target_probability(model, tokens, first) -> torch.Tensor:
    """p(first target token) of each row from a plain forward: (B,)."""
    with torch.no_grad():
        p = target_probability(model(tokens), tokens)  # (B, T-1)
    return p[first]


def test_rolling_z_gives_each_row_the_next_rows_z_and_keeps_everything_else():
    _, batch = tiny()
    rolled = batch.rolled("z")
    assert torch.equal(rolled[:, 8:10], batch.tokens.roll(-1, dims=0)[:, 8:10])
    outside = ~batch.positions["z"]
    assert torch.equal(rolled[outside], batch.tokens[outside])


def test_loss_probe_reports_first_target_z_shuffled_and_their_gap():
    model, batch = tiny()
    ((name, measurements),) = measure_model(model, batch, [LossProbe(**SELECTOR_STUDY.probe_options["loss"])])
    values = {m.metric: float(m.value) for m in measurements}
    first = batch.positions["first_target"]
    clean = -first_target_probability(model, batch.tokens, first).log().mean()
    shuffled_tokens = batch.rolled("z")
    with torch.no_grad():
        p = target_probability(model(shuffled_tokens), batch.tokens)  # the original targets, shuffled z
    shuffled = -p[first].log().mean()
    assert values["first_target"] == pytest.approx(float(clean), abs=1e-5)
    assert values["z_shuffled"] == pytest.approx(float(shuffled), abs=1e-5)
    assert values["z_shuffle_gap"] == pytest.approx(float(shuffled - clean), abs=1e-5)
    assert "copy" not in values  # induction metrics stay with induction batches


def test_patching_the_embeddings_at_z_gives_the_partners_prediction():
    """Layer 0 is the embeddings: patching z there turns example 1 into example 2 (same B), so
    e_0 = p(target₂ | example 2) − p(target₂ | example 1), computed here by two plain forwards."""
    model, batch = tiny()
    ((_, measurements),) = measure_model(model, batch, [PatchingProbe(**SELECTOR_STUDY.probe_options["patching"])])
    values = {m.metric: m.value for m in measurements}
    partner = batch.pair_index
    first = batch.positions["first_target"]
    with torch.no_grad():
        own = target_probability(model(batch.tokens), batch.tokens[partner])[first]  # p(target₂ | example 1)
        theirs = target_probability(model(batch.tokens[partner]), batch.tokens[partner])[first]  # p(target₂ | example 2)
    assert float(values["effect"][0]) == pytest.approx(float((theirs - own).mean()), abs=1e-5)
    assert values["effect"].shape == (2,)
    assert float(values["z_dependence"]) >= float(values["effect"].max()) - 1e-6


def test_random_z_probe_measures_the_probability_drop_and_argmax_changes_when_z_is_swapped():
    model, batch = tiny()
    ((_, measurements),) = measure_model(model, batch, [RandomZProbe(selector="z", read="first_target")])
    values = {m.metric: float(m.value) for m in measurements}
    swapped = batch.rolled("z")
    differs = (swapped != batch.tokens).any(-1)
    with torch.no_grad():
        clean_logits, other_logits = model(batch.tokens)[:, 10], model(swapped)[:, 10]
    target = batch.tokens[:, 11]
    drop = clean_logits.softmax(-1)[range(16), target] - other_logits.softmax(-1)[range(16), target]
    change = (clean_logits.argmax(-1) != other_logits.argmax(-1)).float()
    assert values["p_drop"] == pytest.approx(float(drop[differs].mean()), abs=1e-5)
    assert values["argmax_change"] == pytest.approx(float(change[differs].mean()), abs=1e-6)
    with pytest.raises(ValueError, match="position set 'z'"):
        measure_model(model, TaskBatch(tokens=batch.tokens, loss_mask=batch.loss_mask), [RandomZProbe(selector="z", read="first_target")])


def test_attention_to_and_logit_lens_read_z_and_the_first_target_as_the_task_declares():
    model, batch = tiny()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens)
    inputs = ProbeInputs(acts=cache, batch=batch, model=model, n_layers=1, n_heads=4)
    with torch.no_grad():
        (mass,) = AttentionToProbe(**SELECTOR_STUDY.probe_options["attention_to"]).compute(inputs)
        lens = {m.metric: m.value for m in LogitLensProbe(**SELECTOR_STUDY.probe_options["logit_lens"]).compute(inputs)}
    pattern = cache["blocks.0.attn.hook_pattern"]  # (B, H, Q, K)
    assert mass.value[0].tolist() == pytest.approx(pattern[:, :, 10, 8:10].sum(-1).mean(0).tolist(), abs=1e-5)
    p_output = first_target_probability(model, batch.tokens, batch.positions["first_target"]).mean()
    assert float(lens["p_correct"][-1]) == pytest.approx(float(p_output), abs=1e-5)
