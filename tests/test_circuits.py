"""Circuits: the graph of an adapter model, exact edge patching against its definition, EAP / EAP-IG, the probe."""

from __future__ import annotations

import pytest
import torch

import phaselens as pl
from phaselens.models.config import ModelConfig
from phaselens.models.transformer import Transformer
from phaselens.probes.circuits import fresh_tokens, study_pairs
from phaselens.probes.edge_graph import EdgeGraph, Pairs
from phaselens.probes.plan import PlanContext, plan_probes
from phaselens.tasks.induction import induction_probe_batch
from phaselens.training.config import RunConfig, from_dict


def tiny(d_mlp: int = 0) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_mlp=d_mlp, d_vocab=32, n_ctx=32, init_std=0.3)
    return Transformer(cfg).eval()


def pairs_for(vocab: int = 32, seq: int = 32) -> Pairs:
    batch = induction_probe_batch(list(range(vocab)), seq, 6, torch.Generator().manual_seed(0))
    return study_pairs(batch, "source", "copy", list(range(vocab)), seed=0)


def test_the_demo_model_graph_has_29_edges_into_q_k_v_separately_and_logits():
    graph = EdgeGraph(tiny())
    assert len(graph) == 29
    assert {"L0H1->L1H0.k", "embed->L1H1.q", "L1H0->logits", "embed->L0H0.v"} <= set(graph.names)
    assert not any(name.startswith("L1H") and "->L1H" in name for name in graph.names)  # no edge within a layer
    with_mlp = EdgeGraph(tiny(d_mlp=64))
    assert {"L0M->L1M", "L1H0->L1M", "L0M->L1H1.k", "L1M->logits"} <= set(with_mlp.names)


def test_fresh_tokens_differ_from_the_ones_they_replace_and_are_seeded():
    tokens = torch.randint(0, 8, (4, 16), generator=torch.Generator().manual_seed(1))
    where = torch.zeros(4, 16, dtype=torch.bool)
    where[:, 3:9] = True
    out = fresh_tokens(tokens, where, list(range(8)), seed=0)
    assert (out[where] != tokens[where]).all() and (out[~where] == tokens[~where]).all()
    assert torch.equal(out, fresh_tokens(tokens, where, list(range(8)), seed=0))


def reference_exact(model: Transformer, pairs: Pairs, edge: str) -> float:
    """The definition, computed by an explicit forward: the edge's one input gets out_u(corrupt) − out_u(clean)."""
    cfg = model.cfg

    def forward(tokens, delta_into=None, delta=None):
        T = tokens.shape[1]
        outs = {"embed": model.W_E[tokens] + model.W_pos[:T]}
        resid = outs["embed"]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        for l, block in enumerate(model.blocks):
            a = block.attn
            z_out = 0
            for h in range(cfg.n_heads):
                proj = {}
                for kind, W, b in (("q", a.W_Q, a.b_Q), ("k", a.W_K, a.b_K), ("v", a.W_V, a.b_V)):
                    x = resid + (delta if delta_into == f"L{l}H{h}.{kind}" else 0)
                    proj[kind] = block.ln1(x) @ W[h] + b[h]  # (B, T, dh)
                scores = (proj["q"] @ proj["k"].transpose(-1, -2)) / cfg.d_head ** 0.5
                pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
                outs[f"L{l}H{h}"] = (pattern @ proj["v"]) @ a.W_O[h]
                z_out = z_out + outs[f"L{l}H{h}"]
            resid = resid + z_out + a.b_O
            if block.has_mlp:
                x = resid + (delta if delta_into == f"L{l}M" else 0)
                outs[f"L{l}M"] = block.mlp(block.ln2(x))
                resid = resid + outs[f"L{l}M"]
        logits = model.unembed(model.ln_final(resid + (delta if delta_into == "logits" else 0)))
        return logits, outs

    upstream, into = edge.split("->")
    with torch.no_grad():
        clean_logits, clean = forward(pairs.clean)
        _, corrupt = forward(pairs.corrupt)
        patched, _ = forward(pairs.clean, into, corrupt[upstream] - clean[upstream])
    return float(pairs.loss(patched)[0] - pairs.loss(clean_logits)[0])


@pytest.mark.parametrize("d_mlp", [0, 64])
def test_exact_scores_equal_a_direct_computation_of_the_definition(d_mlp):
    model, pairs = tiny(d_mlp), pairs_for()
    graph = EdgeGraph(model)
    scores = graph.scores(pairs, ("exact",)).by_method["exact"]
    for name in graph.names:
        assert scores[graph.index[name]].item() == pytest.approx(reference_exact(model, pairs, name), abs=1e-4), name
    assert scores.abs().max() > 1e-3  # the pairs differ where it matters


def test_eap_is_eap_ig_with_one_step_and_both_approximate_exact_patching():
    model, pairs = tiny(), pairs_for()
    graph = EdgeGraph(model)
    result = graph.scores(pairs, ("exact", "eap", "eap_ig"), steps=5)
    assert torch.allclose(graph.attribution(pairs, steps=1), result.by_method["eap"], atol=1e-6)
    exact = result.by_method["exact"]
    for method in ("eap", "eap_ig"):
        assert torch.corrcoef(torch.stack([exact, result.by_method[method]]))[0, 1] > 0.5, method


def test_the_circuit_is_the_smallest_top_edge_set_that_is_faithful_when_the_rest_is_patched(monkeypatch):
    import math

    from phaselens.probes import edge_graph

    model, pairs = tiny(), pairs_for()
    graph = EdgeGraph(model)
    result = graph.scores(pairs, ("exact",))
    if not result.has_effect:  # a random model's corruption barely moves the metric: no circuit is claimed
        circuit, faithfulness = result.circuit("exact", threshold=0.8)
        assert circuit == [] and math.isnan(faithfulness)
        monkeypatch.setattr(edge_graph, "MIN_EFFECT", 0.0)  # the search itself, on this small gap
        monkeypatch.setattr(edge_graph, "EFFECT_SE", 0.0)
    circuit, faithfulness = result.circuit("exact", threshold=0.8)
    assert faithfulness >= 0.8 and 1 <= len(circuit) <= len(graph)
    everything = torch.zeros(1, len(graph))
    assert result.faithfulness(graph.patched_loss(pairs, result.corrupt_out, everything)).item() == pytest.approx(1, abs=1e-4)
    nothing = torch.ones(1, len(graph))  # every edge corrupted: the corrupted run itself
    assert result.faithfulness(graph.patched_loss(pairs, result.corrupt_out, nothing)).item() == pytest.approx(0, abs=1e-4)


def config_for(kind: str) -> RunConfig:
    model = {"kind": kind, "n_layers": 2, "n_heads": 2, "d_model": 32, "d_vocab": 64, "n_ctx": 64}
    if kind == "bdh":
        model["multiplier"] = 4
    return from_dict(RunConfig, {"name": "t", "model": model, "data": {"task": "induction"}}, origin="test")


def test_the_plan_runs_circuits_post_hoc_with_the_studys_pairs_live_on_that_batch_and_refuses_bdh():
    plan = plan_probes(PlanContext.of(config_for("transformer")), "post_hoc", ["circuits"]).require()
    assert plan.options["circuits"]["patch"] == "source" and plan.options["circuits"]["read"] == "copy"
    live = plan_probes(PlanContext.of(config_for("transformer")), "live", ["circuits"])
    # live, it is measured on a copy of the weights, on the batch it reads post-hoc (tests/test_dashboard_circuits_live.py)
    assert not live.refused and live.routes["circuits"] == plan.routes["circuits"]
    bdh = plan_probes(PlanContext.of(config_for("bdh")), "post_hoc", ["circuits"])
    assert bdh.refused and "circuits graph" in bdh.refused[0].reason


def test_phaselens_probe_circuits_writes_edges_that_run_edges_reads(run_copy):
    from phaselens.posthoc.runner import run_probes

    run_probes(run_copy, probes=["circuits"], progress=False)
    run = pl.open_run(run_copy)
    edges = run.edges()
    assert list(edges.columns[:7]) == ["step", "edge", "upstream", "downstream", "input", "method", "score"]
    assert sorted(edges["step"].unique()) == run.checkpoint_steps()
    assert edges.groupby(["step", "method"]).size().eq(29).all()
    assert set(edges["method"]) == {"exact", "eap", "eap_ig"}
    rows = run.metrics(probe="circuits")
    assert {"circuit_size", "faithfulness", "node_score"} <= set(rows["metric"])


@pytest.fixture(scope="module")
def bridges(tiny_hf_models):
    from transformer_lens.model_bridge import TransformerBridge

    return {name: TransformerBridge.boot_transformers(str(tiny_hf_models[name]), device="cpu").eval() for name in ("gpt2", "gpt_neox")}


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox"])
def test_a_bridge_graph_patches_one_heads_k_input_and_the_logits_as_the_definition_says(bridges, name):
    from phaselens.models.adapter import adapter_for

    adapter = adapter_for(bridges[name])
    graph = EdgeGraph(adapter)
    parallel = name == "gpt_neox"  # its MLP reads the block's input: no edge from a head of the same layer
    assert ("L1H0->L1M" in graph.names) != parallel and "L0H1->L1H0.k" in graph.names
    ids = adapter.tokenizer.ordinary_ids()
    pairs = study_pairs(induction_probe_batch(ids, 40, 4, torch.Generator().manual_seed(0)), "source", "copy", ids, seed=0)
    scores = graph.scores(pairs, ("exact", "eap", "eap_ig")).by_method
    sites = adapter.graph_sites()
    clean_out, clean_logits = graph.outputs(pairs.clean)
    corrupt_out, _ = graph.outputs(pairs.corrupt)
    clean_loss = pairs.loss(clean_logits)[0]
    u = graph.nodes.index("L0H1")
    delta = corrupt_out[u] - clean_out[u]  # (B, T, d)

    def into_k(act, hook):  # the definition by hand: head 0's k input of layer 1 gets the difference
        act = act.clone()
        act[:, :, 0] += delta
        return act

    with torch.no_grad(), adapter.graph_session():
        by_hand = pairs.loss(adapter.run_with_hooks(pairs.clean, [(sites.head_in[1]["k"], into_k)]))[0] - clean_loss
        cache = adapter.run_with_cache(pairs.clean, [sites.logits_in])[1][sites.logits_in]
        direct = pairs.loss(adapter.logits_from(cache + delta))[0] - clean_loss  # L0H1->logits through the final norm
    assert scores["exact"][graph.index["L0H1->L1H0.k"]].item() == pytest.approx(by_hand.item(), abs=1e-4)
    assert scores["exact"][graph.index["L0H1->logits"]].item() == pytest.approx(direct.item(), abs=1e-4)
    assert all(torch.isfinite(s).all() for s in scores.values())


def test_eap_costs_the_same_forwards_and_backwards_whatever_the_edge_count_and_exact_grows_with_edges():
    def passes(graph: EdgeGraph, score) -> tuple[int, int, int]:
        """(forwards, of them with autograd: one backward each, sequences carried) of `score()`."""
        counted = [0, 0, 0]

        def count(module, args):
            counted[0] += 1
            counted[1] += torch.is_grad_enabled()
            counted[2] += args[0].shape[0]

        handle = graph.adapter.hook_points[graph.sites.embed_out].register_forward_pre_hook(count)
        try:
            score()
        finally:
            handle.remove()
        return tuple(counted)

    batch = induction_probe_batch(list(range(32)), 32, 2, torch.Generator().manual_seed(0))
    pairs = study_pairs(batch, "source", "copy", list(range(32)), seed=0)  # 2 sequences: exact's cost is edges × sequences
    torch.manual_seed(0)
    deeper = Transformer(ModelConfig(n_layers=3, n_heads=2, d_model=32, d_mlp=64, d_vocab=32, n_ctx=32, init_std=0.3)).eval()
    small, large = EdgeGraph(tiny()), EdgeGraph(deeper)
    assert (len(small), len(large)) == (29, 100)
    eap = [passes(g, lambda g=g: g.attribution(pairs, steps=1)) for g in (small, large)]
    assert eap[0] == eap[1] == (3, 1, 3 * len(pairs.clean))  # clean and corrupt outputs, one clean forward + backward
    assert passes(large, lambda: large.attribution(pairs, steps=5)) == (7, 5, 7 * len(pairs.clean))
    exact = [passes(g, lambda g=g: g.exact(pairs))[2] for g in (small, large)]
    assert exact == [(2 + len(g)) * len(pairs.clean) for g in (small, large)]  # one patched sequence per edge and sequence
