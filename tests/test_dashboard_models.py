"""The dashboard's model view on models that are not phaselens transformers: a revision of an imported
Hugging Face series (a tiny GPT-NeoX saved with `transformers`, imported with `phaselens import-hf`)
and a `TransformerBridge` handed over from a notebook. Values are checked against the Hugging Face
model's own forward pass."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch
from fastapi.testclient import TestClient

import phaselens as pl
from phaselens.server import build

TEXT = "the cat sat on the mat . the cat sat on the mat ."
LOCAL = "http://127.0.0.1:8050"  # a server bound to loopback answers only requests addressed to this machine


@pytest.fixture(scope="module")
def client(imported_run):
    app, _ = build([imported_run])
    with TestClient(app, base_url=LOCAL) as client:
        yield client


@pytest.fixture(scope="module")
def name(imported_run):
    return imported_run.name


def revision_dir(imported_run, step: int):
    reference = json.loads((imported_run / "checkpoints" / f"step_{step:08d}" / "reference.json").read_text())
    return f"{reference['source']}/{reference['revision']}"


def hf_model(imported_run, step: int):
    """The revision as Hugging Face itself loads it (eager attention, so it can return its patterns)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(revision_dir(imported_run, step), attn_implementation="eager").eval()


def hf_tokens(imported_run, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(revision_dir(imported_run, 0))(text, add_special_tokens=False)["input_ids"]


def next_token_losses(logits: torch.Tensor, ids: list[int]) -> list[float]:
    """Per-position next-token loss of one sequence: logits (1, T, V) -> T-1 values."""
    return torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]), reduction="none").tolist()


def test_an_imported_revision_shows_its_architecture_and_takes_plain_text_through_its_tokenizer(client, name, imported_run):
    arch = client.post("/api/model/architecture", json={"run": name, "step": 10}).json()
    assert arch["architecture"] == "GPTNeoXForCausalLM" and arch["source"] == "checkpoint"
    assert (arch["n_layers"], arch["n_heads"], arch["mlp_layers"], arch["d_vocab"]) == (2, 4, [0, 1], 320)
    assert arch["tokenizer"] == "hf" and "tokenizer" in arch["text_hint"]

    ids = hf_tokens(imported_run, TEXT)
    loss = client.post("/api/model/loss", json={"run": name, "step": 10, "text": TEXT}).json()
    assert loss["tokens"] == ids and loss["labels"] == TEXT.split()  # decoded, one word per token
    with torch.no_grad():
        expected = next_token_losses(hf_model(imported_run, 10)(torch.tensor([ids])).logits, ids)
    assert loss["loss"] == pytest.approx(expected, abs=1e-4)
    assert loss["copy_positions"][7:11] == [True] * 4  # "cat sat on the" follows an earlier copy
    as_ids = client.post("/api/model/loss", json={"run": name, "step": 10, "text": " ".join(map(str, ids))}).json()
    assert as_ids["loss"] == loss["loss"]  # token ids are still accepted
    later = client.post("/api/model/loss", json={"run": name, "step": 30, "text": TEXT}).json()
    assert later["mean_loss"] < loss["mean_loss"] - 0.1  # each revision is served as it is: step 30 has learnt more

    attention = client.post("/api/model/attention", json={"run": name, "step": 10, "text": TEXT, "layer": 1, "head": 2}).json()
    with torch.no_grad():
        patterns = hf_model(imported_run, 10)(torch.tensor([ids]), output_attentions=True).attentions
    assert attention["labels"] == TEXT.split()
    assert torch.tensor(attention["pattern"]) == pytest.approx(patterns[1][0, 2], abs=1e-4)


def test_ablating_a_head_of_an_imported_revision_matches_zeroing_it_in_the_hf_model(client, name, imported_run):
    ids = hf_tokens(imported_run, TEXT)
    base = {"run": name, "step": 30, "text": TEXT}
    zero = client.post("/api/model/ablate", json={**base, "nodes": [{"layer": 1, "head": 2}], "mode": "zero"}).json()
    model = hf_model(imported_run, 30)
    d_head = model.config.hidden_size // model.config.num_attention_heads

    def drop_head(module, args):  # the output projection's input is the heads' mixed values side by side
        (z,) = args
        z = z.clone()
        z[..., 2 * d_head: 3 * d_head] = 0
        return (z,)

    handle = model.gpt_neox.layers[1].attention.dense.register_forward_pre_hook(drop_head)
    with torch.no_grad():
        expected = next_token_losses(model(torch.tensor([ids])).logits, ids)
    handle.remove()
    assert zero["ablated"]["loss"] == pytest.approx(expected, abs=1e-4)
    assert max(abs(d) for d in zero["delta"]) > 1e-3

    mlp_zero = client.post("/api/model/ablate", json={**base, "nodes": [{"layer": 0}], "mode": "zero"}).json()
    mlp_mean = client.post("/api/model/ablate", json={**base, "nodes": [{"layer": 0}], "mode": "mean"}).json()
    assert max(abs(d) for d in mlp_zero["delta"]) > 1e-3 and mlp_mean["ablated"]["loss"] != mlp_zero["ablated"]["loss"]
    frozen = client.post("/api/model/ablate", json={**base, "nodes": [{"layer": 1, "head": 0}, {"layer": 1}], "mode": "freeze",
                                                    "reference_text": TEXT}).json()
    assert frozen["delta"] == pytest.approx([0.0] * (len(ids) - 1), abs=1e-5)  # held at its own values: nothing changes


def test_head_scores_over_training_of_an_imported_series_are_its_heads_rows(client, name, probed_imported_run):
    """What the model view plots for a clicked head: the heads probe's rows of every revision, equal to the
    scores of the HF model's own attentions on the series' induction batch; none before `phaselens probe`."""
    from phaselens.probes.heads import HEAD_SCORES, detection_stack, head_scores

    empty = client.get(f"/api/runs/{name}/metrics", params={"probe": "heads"}).json()
    assert empty["step"] == []  # the page then shows how to measure them
    app, _ = build([probed_imported_run])
    with TestClient(app, base_url=LOCAL) as probed:
        rows = probed.get("/api/runs/probed/metrics", params={"probe": "heads"}).json()
    assert sorted(set(rows["step"])) == [0, 10, 30]
    assert len(rows["step"]) == 3 * 2 * 4 * 3  # revisions × layers × heads × scores
    assert set(rows["metric"]) == set(HEAD_SCORES) and set(rows["source"]) == {"checkpoint"}

    tokens = pl.open_run(probed_imported_run).probe_batches()["induction"].tokens  # (B, T)
    with torch.no_grad():
        attentions = hf_model(probed_imported_run, 30)(tokens, output_attentions=True).attentions  # L x (B, H, T, T)
    direct = head_scores(torch.stack(attentions), detection_stack(tokens, torch.float32))  # (L, H, S)
    stored = {(layer, head, metric): value for step, layer, head, metric, value in
              zip(rows["step"], rows["layer"], rows["head"], rows["metric"], rows["value"]) if step == 30}
    channels = ("induction", "duplicate", "prev_token")  # detection_stack's order
    for (layer, head, metric), value in stored.items():
        assert value == pytest.approx(float(direct[layer, head, channels.index(metric)]), abs=1e-4)


def test_patching_gradients_and_circuits_of_an_imported_revision(client, name):
    sample = client.get(f"/api/runs/{name}/sample", params={"step": 30}).json()
    assert not sample["text"][:1].isdigit() and len(sample["text"].split()) == len(sample["tokens"])  # shown as its words
    clean, corrupted = sample["text"], sample["corrupted_text"]
    full = client.post("/api/model/patch", json={"run": name, "step": 30, "clean_text": clean, "corrupted_text": corrupted,
                                                  "hook": "resid_pre", "layer": 0}).json()
    assert full["hook_name"] == "blocks.0.hook_resid_pre"
    assert full["patched_logit_diff"] == pytest.approx(full["clean_logit_diff"], abs=1e-4)  # patching everything restores it
    assert full["clean_logit_diff"] != pytest.approx(full["corrupted_logit_diff"], abs=1e-4)
    assert full["answer_label"] and full["wrong_label"] and full["answer"] != full["wrong"]
    head = client.post("/api/model/patch", json={"run": name, "step": 30, "clean_text": clean, "corrupted_text": corrupted,
                                                  "hook": "head", "layer": 1, "head": 1}).json()
    assert head["hook_name"] == "blocks.1.attn.hook_z" and head["patched_logit_diff"] != head["corrupted_logit_diff"]

    gradients = client.post("/api/model/gradients", json={"run": name, "step": 30, "text": TEXT, "position": 3}).json()
    assert all(g == 0 for g in gradients["grad_norm"][5:]) and gradients["grad_norm"][3] > 0  # later tokens cannot matter

    weights = client.post("/api/model/weights", json={"run": name, "step": 30, "layer": 1, "head": 2}).json()
    words = set(TEXT.split()) | {"a", "dog", "old", "man", "my", "sister", "bird", "looked", "at", "ran", "to", "sang", "found",
                                 "tree", "house", "river", "song"}
    # 320 embedding rows past 256: the circuits are shown on the head's top-k ordinary tokens, never padding or specials
    assert weights["space"] == "top_k" and "tokens this head" in weights["note"]
    assert set(weights["labels"]) <= words and len(weights["labels"]) == len(weights["qk"]) == len(weights["ov"][0]) > 5


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/model/loss", {"step": 30, "text": "cat"}, 400, "at least 2"),
    ("/api/model/loss", {"step": 30, "text": "1 2 320"}, 400, "below the vocabulary size 320"),
    ("/api/model/loss", {"step": 30, "text": "the cat " * 40}, 400, "context holds 64"),
    ("/api/model/ablate", {"step": 30, "text": TEXT, "nodes": [{"layer": 0, "head": 4}]}, 400, "head 4 does not exist"),
    ("/api/model/patch", {"step": 30, "clean_text": "the cat sat", "corrupted_text": "the cat"}, 400, "same number of tokens"),
])
def test_bad_input_to_an_imported_revision_gets_a_message(client, name, path, body, status, words):
    response = client.post(path, json={"run": name, **body})
    assert response.status_code == status and words in response.json()["error"], response.text


def test_a_bridge_from_the_notebook_is_served_by_reference(imported_run):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(revision_dir(imported_run, 30), device="cpu")
    handle = pl.serve(model=bridge)
    try:
        def call(path, body=None):
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(handle.url + path.lstrip("/"), data=data, headers={"Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(request, timeout=60))

        runs = call("/api/runs")["runs"]
        assert [(r["name"], r["config"]["model.kind"]) for r in runs] == [("kernel", "GPTNeoXForCausalLM")]
        arch = call("/api/model/architecture", {"run": "kernel"})
        assert arch["source"] == "kernel" and arch["n_heads"] == 4 and arch["tokenizer"] == "hf"
        sample = call("/api/runs/kernel/sample")
        assert len(sample["tokens"]) >= 16 and len(set(sample["tokens"])) < len(sample["tokens"])  # a repeated segment
        before = call("/api/model/loss", {"run": "kernel", "text": TEXT})
        assert before["labels"] == TEXT.split()
        ablated = call("/api/model/ablate", {"run": "kernel", "text": TEXT, "nodes": [{"layer": 1, "head": 2}], "mode": "mean"})
        assert ablated["clean"]["loss"] == pytest.approx(before["loss"], abs=1e-6) and max(map(abs, ablated["delta"])) > 1e-4
        saved = bridge.original_model.get_output_embeddings().weight.detach().clone()
        with torch.no_grad():
            bridge.original_model.get_output_embeddings().weight.zero_()  # an edit in the notebook: every logit 0, the loss ln 320
        assert call("/api/model/loss", {"run": "kernel", "text": TEXT})["loss"] == pytest.approx([math.log(320)] * 13, abs=1e-5)
        with torch.no_grad():
            bridge.original_model.get_output_embeddings().weight.copy_(saved)
    finally:
        handle.stop()


def test_a_model_phaselens_cannot_read_is_refused_when_served():
    with pytest.raises(pl.errors.PhaselensError, match="no model adapter"):
        build([], model=torch.nn.Linear(2, 2))


def test_a_bdh_model_gets_the_views_that_apply_and_a_reason_for_the_rest():
    from phaselens.models.bdh_config import BDHConfig

    model = pl.build_model(BDHConfig(n_layers=2, d_model=32, n_heads=2, multiplier=4, n_ctx=64)).eval()
    app, _ = build([], model=model)
    with TestClient(app, base_url=LOCAL) as client:
        arch = client.post("/api/model/architecture", json={"run": "kernel"}).json()
        assert (arch["architecture"], arch["n_heads"], arch["mlp_layers"], arch["tokenizer"]) == ("BDH", 0, [], "bytes")
        loss = client.post("/api/model/loss", json={"run": "kernel", "text": "to be or"}).json()
        assert loss["labels"] == ["t", "o", "␣", "b", "e", "␣", "o", "r"] and len(loss["loss"]) == 7
        refused = client.post("/api/model/attention", json={"run": "kernel", "text": "to be or", "layer": 0, "head": 0})
        assert refused.status_code == 400 and "no softmax attention heads" in refused.json()["error"]


OUTPUT_PROJECTION = {  # where each architecture mixes its heads' values back into the stream (a data table, not branches)
    "gpt2": "transformer.h.{layer}.attn.c_proj",
    "gpt_neox": "gpt_neox.layers.{layer}.attention.dense",
    "llama": "model.layers.{layer}.self_attn.o_proj",
}


@pytest.mark.parametrize("architecture", sorted(OUTPUT_PROJECTION))
def test_every_bridge_architecture_gets_loss_attention_and_head_ablation_that_match_the_hf_model(tiny_hf_models, architecture):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    path = tiny_hf_models[architecture]
    text = "the cat sat on the mat while the cat sat on the mat"
    app, _ = build([], model=TransformerBridge.boot_transformers(str(path), device="cpu"))
    with TestClient(app, base_url=LOCAL) as client:
        arch = client.post("/api/model/architecture", json={"run": "kernel"}).json()
        ablated = client.post("/api/model/ablate", json={"run": "kernel", "text": text, "nodes": [{"layer": 1, "head": 3}], "mode": "zero"}).json()
        weights = client.post("/api/model/weights", json={"run": "kernel", "layer": 1, "head": 3}).json()
    ids = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    d_head = arch["d_model"] // arch["n_heads"]

    def drop_head(module, args):
        z = args[0].clone()
        z[..., 3 * d_head: 4 * d_head] = 0
        return (z, *args[1:])

    with torch.no_grad():
        clean = next_token_losses(model(torch.tensor([ids])).logits, ids)
        handle = model.get_submodule(OUTPUT_PROJECTION[architecture].format(layer=1)).register_forward_pre_hook(drop_head)
        expected = next_token_losses(model(torch.tensor([ids])).logits, ids)
        handle.remove()
    assert (arch["n_layers"], arch["n_heads"], arch["tokenizer"]) == (2, 4, "hf")
    assert ablated["clean"]["labels"] == text.split() and ablated["clean"]["loss"] == pytest.approx(clean, abs=1e-4)
    assert ablated["ablated"]["loss"] == pytest.approx(expected, abs=1e-4)
    assert weights["space"] == "token" and len(weights["qk"]) == 96  # 96 tokens: the whole vocabulary
