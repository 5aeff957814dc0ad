"""The model adapter answers the same questions for phaselens models and Hugging Face models."""

from __future__ import annotations

import pytest
import torch

from phaselens.models import build_model
from phaselens.models.adapter import (
    FAST_PATHS,
    BridgeAdapter,
    TransformerAdapter,
    UnsupportedModel,
    adapter_for,
)
from phaselens.models.bdh_config import BDHConfig
from phaselens.models.config import ModelConfig

ARCHITECTURES = ("gpt2", "gpt_neox", "llama")


@pytest.fixture(scope="module")
def bridges(tiny_hf_models):
    from transformer_lens.model_bridge import TransformerBridge

    models = {}
    for name, path in tiny_hf_models.items():
        bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
        bridge.eval()
        models[name] = bridge
    return models


def test_phaselens_transformer_adapter_reads_its_config_and_weights():
    model = build_model(ModelConfig(n_layers=3, n_heads=2, d_model=16, d_mlp=32, d_vocab=20, n_ctx=12)).eval()
    adapter = adapter_for(model)
    assert isinstance(adapter, TransformerAdapter)
    assert (adapter.n_layers, adapter.n_heads, adapter.d_model, adapter.d_head, adapter.d_vocab, adapter.n_ctx) == (3, 2, 16, 8, 20, 12)
    assert adapter.mlp_layers == (0, 1, 2) and adapter.has_mlp(1)
    assert adapter.capabilities == frozenset(FAST_PATHS)
    weights = adapter.head_weights()
    assert weights.W_Q.shape == (3, 2, 16, 8) and weights.W_O.shape == (3, 2, 8, 16)
    assert torch.equal(weights.W_K[1], model.blocks[1].attn.W_K)
    assert adapter.tokenizer.kind == "ids" and adapter.tokenizer.encode("3 4, 19") == [3, 4, 19]
    assert adapter.tokenizer.decode([3, 4, 19]) == "3 4 19"
    with pytest.raises(ValueError, match="below the vocabulary size 20"):
        adapter.tokenizer.encode("3 25")


def test_attention_only_transformer_has_no_mlp():
    adapter = adapter_for(build_model(ModelConfig()))
    assert adapter.mlp_layers == () and not adapter.has_mlp(0)


def test_residual_sites_are_the_embeddings_then_each_block_output():
    adapter = adapter_for(build_model(ModelConfig(n_layers=2)))
    assert [(s.index, s.hook, s.label) for s in adapter.residual_sites] == [
        (0, "blocks.0.hook_resid_pre", "embeddings"),
        (1, "blocks.0.hook_resid_post", "after block 0"),
        (2, "blocks.1.hook_resid_post", "after block 1 (output)"),
    ]
    assert adapter.final_norm_site.hook == "ln_final.hook_normalized"


def test_fast_paths_equal_the_hooked_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, d_mlp=16)).eval()
    adapter = adapter_for(model)
    tokens = torch.randint(0, 64, (2, 10))
    names = [site.hook for site in adapter.residual_sites]
    with torch.no_grad():
        logits, cache = adapter.run_with_cache(tokens, names)
        streams = adapter.residual_streams(tokens)
        for site, stream in zip(adapter.residual_sites, streams):
            torch.testing.assert_close(stream, cache[site.hook])
            torch.testing.assert_close(adapter.forward_from(stream, site.index), logits)
        torch.testing.assert_close(adapter.logits_from(cache[names[-1]]), logits)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_bridge_adapter_reads_dimensions_sites_and_unembedding(bridges, name):
    bridge = bridges[name]
    adapter = adapter_for(bridge)
    assert isinstance(adapter, BridgeAdapter)
    assert (adapter.n_layers, adapter.n_heads, adapter.d_model, adapter.d_head, adapter.d_vocab) == (2, 4, 32, 8, 96)
    assert adapter.n_ctx == 64 and adapter.architecture == type(bridge.original_model).__name__
    assert adapter.device == torch.device("cpu") and adapter.dtype == torch.float32
    assert adapter.mlp_layers == (0, 1)
    assert adapter.capabilities == frozenset() and not adapter.supports("forward_from")
    with pytest.raises(UnsupportedModel, match="forward_from"):
        adapter.forward_from(torch.zeros(1, 2, 32), 0)
    assert adapter.embedding().shape == (96, 32) and adapter.unembedding().shape == (32, 96)
    tokens = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6]])
    names = [site.hook for site in adapter.residual_sites] + [adapter.final_norm_site.hook, adapter.pattern_hook(1),
                                                                adapter.z_hook(0), adapter.mlp_out_hook(1), adapter.embed_hook]
    assert all(n in adapter.hook_points for n in names)
    with torch.no_grad():
        logits, cache = adapter.run_with_cache(tokens, names)
        # the last residual stream through the final norm and unembedding is the model's prediction
        torch.testing.assert_close(adapter.logits_from(cache[adapter.residual_sites[-1].hook]), logits)
        torch.testing.assert_close(logits, adapter.logits(tokens))
    assert cache[adapter.pattern_hook(1)].shape == (1, 4, 8, 8)
    weights = adapter.head_weights()
    for w in (weights.W_Q, weights.W_K, weights.W_V):
        assert w.shape == (2, 4, 32, 8)  # Llama's 2 key/value heads repeated for its 4 query heads
    assert weights.W_O.shape == (2, 4, 8, 32)


def test_gpt2_head_weights_reproduce_its_attention_pattern(bridges):
    """W_Q, W_K (and biases) of head h applied to the normalised stream give the pattern the model computed."""
    bridge = bridges["gpt2"]
    adapter = adapter_for(bridge)
    tokens = torch.tensor([[3, 9, 4, 5, 11, 3, 9, 4]])
    with torch.no_grad():
        _, cache = adapter.run_with_cache(tokens, ["blocks.1.ln1.hook_out", adapter.pattern_hook(1)])
        x = cache["blocks.1.ln1.hook_out"][0]  # (T, d)
        w = adapter.head_weights()
        q = torch.einsum("td,hde->hte", x, w.W_Q[1]) + bridge.b_Q[1][:, None]
        k = torch.einsum("td,hde->hte", x, w.W_K[1]) + bridge.b_K[1][:, None]
        scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5  # (H, T, T)
        scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), cache[adapter.pattern_hook(1)][0], atol=1e-5, rtol=1e-4)


def test_bridge_tokenizer_is_the_models_own(bridges, tiny_hf_models):
    from transformers import AutoTokenizer

    adapter = adapter_for(bridges["gpt_neox"])
    own = AutoTokenizer.from_pretrained(tiny_hf_models["gpt_neox"])
    assert adapter.tokenizer.kind == "hf"
    ids = adapter.tokenizer.encode("the cat sat on the mat")
    assert ids == own("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert adapter.tokenizer.labels(ids) == ["the", "cat", "sat", "on", "the", "mat"]
    assert adapter.tokenizer.decode(ids) == own.decode(ids)
    assert adapter.tokenizer.special_ids == frozenset(own.all_special_ids) and adapter.tokenizer.special_ids


def test_bdh_adapter_offers_what_applies():
    model = build_model(BDHConfig(n_layers=2, d_model=16, n_heads=2, multiplier=4, d_vocab=256, n_ctx=32)).eval()
    adapter = adapter_for(model)
    assert adapter.kind == "bdh" and not adapter.has_attention and adapter.head_weights() is None
    assert adapter.tokenizer.kind == "bytes" and adapter.tokenizer.encode("hé") == [104, 195, 169]
    assert adapter.tokenizer.labels([104, 10]) == ["h", "\\x0a"]
    assert adapter.tokenizer.decode([104, 195, 169]) == "hé"
    assert adapter.final_norm_site is None
    with pytest.raises(UnsupportedModel, match="no softmax pattern"):
        adapter.pattern_hook(0)
    tokens = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        logits, cache = adapter.run_with_cache(tokens, [s.hook for s in adapter.residual_sites])
        torch.testing.assert_close(adapter.logits_from(cache[adapter.residual_sites[-1].hook]), logits)


def test_an_unknown_model_is_refused_with_what_is_supported():
    with pytest.raises(UnsupportedModel, match="no model adapter for torch.nn.modules.linear.Linear.*TransformerBridge"):
        adapter_for(torch.nn.Linear(2, 2))


# What only the adapter reads off a model: TransformerLens's hook table and config, a bridge's wrapped
# model, and the modules that hold the norm, the blocks, the (un)embedding.
MODEL_INTERNALS = {"hook_dict", "cfg", "original_model", "blocks", "ln_final", "embed", "unembed", "lm_head", "W_E", "W_U",
                   "W_pos", "_forward_hooks", "_forward_pre_hooks"}


def test_probes_the_runner_analysis_report_and_server_read_models_only_through_the_adapter():
    import ast
    from pathlib import Path

    import phaselens

    package = Path(phaselens.__file__).parent
    reads = []
    for layer in ("probes", "posthoc", "analysis", "report", "server"):
        for path in sorted((package / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in MODEL_INTERNALS:
                    reads.append(f"{path.relative_to(package)}:{node.lineno} {ast.unparse(node)}")
    assert reads == []
