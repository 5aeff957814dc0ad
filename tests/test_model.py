"""The hookable transformer: TransformerLens hook names, run_with_cache / run_with_hooks, shapes."""

from __future__ import annotations

import pytest
import torch

from phaselens.models import ModelConfig, build_model

EXPECTED_PER_LAYER = [
    "hook_resid_pre", "hook_attn_out", "hook_resid_post",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
]


@pytest.fixture(scope="module")
def mlp_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layers=2, n_heads=4, d_model=32, d_mlp=64, d_vocab=17, n_ctx=12))


def test_model_has_the_transformer_lens_hook_names(mlp_model):
    names = set(mlp_model.hook_dict)
    assert {"hook_embed", "hook_pos_embed", "ln_final.hook_normalized"} <= names
    for layer in range(2):
        assert {f"blocks.{layer}.{n}" for n in EXPECTED_PER_LAYER} <= names
        assert {f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_mid"} <= names


def test_attention_only_model_has_no_mlp_hooks():
    model = build_model(ModelConfig(n_layers=1, d_mlp=0))
    assert not [n for n in model.hook_dict if "mlp" in n]


def test_run_with_cache_gives_activations_with_documented_shapes(mlp_model):
    tokens = torch.randint(0, 17, (3, 12))
    logits, cache = mlp_model.run_with_cache(tokens)
    assert logits.shape == (3, 12, 17)
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, 4, 12, 12)
    assert cache["blocks.0.attn.hook_q"].shape == (3, 12, 4, 8)
    assert cache["blocks.0.mlp.hook_post"].shape == (3, 12, 64)
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(3, 4, 12))
    assert (pattern.triu(1) == 0).all()  # causal
    # logit lens needs the final norm and W_U: they reproduce the logits from resid_post
    resid = cache["blocks.1.hook_resid_post"]
    assert torch.allclose(mlp_model.unembed(mlp_model.ln_final(resid)), logits, atol=1e-5)


def test_run_with_hooks_can_ablate_a_head(mlp_model):
    tokens = torch.randint(0, 17, (2, 12))

    def zero_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    clean = mlp_model(tokens)
    ablated = mlp_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    assert not torch.allclose(clean, ablated)
    assert torch.allclose(mlp_model(tokens), clean)  # hooks are gone afterwards


def test_per_head_result_hook_sums_to_the_attention_output(mlp_model):
    tokens = torch.randint(0, 17, (2, 12))
    _, cache = mlp_model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_result", "blocks.0.hook_attn_out"])
    total = cache["blocks.0.attn.hook_result"].sum(2) + mlp_model.blocks[0].attn.b_O
    assert torch.allclose(total, cache["blocks.0.hook_attn_out"], atol=1e-5)


def test_model_without_layernorm_and_too_long_input():
    model = build_model(ModelConfig(n_layers=1, normalization="none", n_ctx=8))
    assert model(torch.randint(0, 64, (1, 8))).shape == (1, 8, 64)
    with pytest.raises(ValueError, match="n_ctx=8"):
        model(torch.randint(0, 64, (1, 9)))


def test_last_block_at_chosen_positions_equals_the_full_forward_there(mlp_model):
    # a different number of positions per sequence, one sequence with none, out of order, one twice
    tokens = torch.randint(0, 17, (4, 12), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([2, 0, 0, 3, 0, 2, 0])
    cols = torch.tensor([11, 5, 0, 7, 9, 3, 5])
    with torch.no_grad():
        full = mlp_model(tokens)
        streams = mlp_model.residual_streams(tokens)
        assert len(streams) == 3 and len(mlp_model.residual_streams(tokens, n_blocks=1)) == 2
        for layer in range(3):
            picked = mlp_model.forward_from(streams[layer], layer, at=(rows, cols))
            torch.testing.assert_close(picked, full[rows, cols], atol=1e-5, rtol=0)
        last = mlp_model.blocks[1].forward_at(streams[1], rows, cols)
        torch.testing.assert_close(last, streams[2][rows, cols], atol=1e-5, rtol=0)
        none = torch.zeros(0, dtype=torch.long)  # no position asked for: no logits, and no error
        assert mlp_model.forward_from(streams[1], 1, at=(none, none)).shape == (0, 17)


def test_last_block_at_chosen_positions_runs_the_whole_block_for_a_hook(mlp_model):
    tokens = torch.randint(0, 17, (2, 12))
    rows, cols = torch.tensor([0, 1]), torch.tensor([4, 6])
    seen = []

    def zero_head(z, hook):
        seen.append(tuple(z.shape))
        z[:, :, 1] = 0.0
        return z

    with torch.no_grad():
        ablated = mlp_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
        entering = mlp_model.residual_streams(tokens)[1]
        mlp_model.blocks[1].attn.hook_z.add_hook(zero_head)
        try:
            picked = mlp_model.forward_from(entering, 1, at=(rows, cols))
        finally:
            mlp_model.reset_hooks()
    assert seen == [(2, 12, 4, 8), (2, 12, 4, 8)]  # the hook saw whole sequences both times
    torch.testing.assert_close(picked, ablated[rows, cols], atol=1e-5, rtol=0)
