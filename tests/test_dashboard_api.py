"""The dashboard's JSON API, route by route, including what it refuses; and the in-process server
that shares a model with the notebook."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch
from fastapi.testclient import TestClient

import phaselens as pl
from phaselens.server import build

SAMPLE_IDS = "5 17 42 9 33 5 17 42 9 33 5 17"
LOCAL = "http://127.0.0.1:8050"  # a server bound to loopback answers only requests addressed to this machine


@pytest.fixture(scope="module")
def client(induction_run):
    app, token = build([induction_run])
    assert token is None  # 127.0.0.1 needs no token
    with TestClient(app, base_url=LOCAL) as client:
        yield client


@pytest.fixture(scope="module")
def name(induction_run):
    return induction_run.name


def test_runs_lists_the_served_run_with_status_steps_and_key_config(client, name):
    runs = client.get("/api/runs").json()["runs"]
    assert [r["name"] for r in runs] == [name]
    run = runs[0]
    assert run["status"] == "finished" and run["checkpoints"] == [0, 10, 20] and run["last_step"] == 20
    assert run["config"]["model.n_layers"] == 2 and run["config"]["data.task"] == "induction"


def test_series_metrics_and_transitions_come_from_the_run(client, name, induction_run):
    series = {(s["probe"], s["metric"]): s["per"] for s in client.get(f"/api/runs/{name}/series").json()["series"]}
    assert series[("attention", "entropy")] == "head" and series[("loss", "copy")] == "model"
    assert series[("attention", "head_variance")] == "layer"
    rows = client.get(f"/api/runs/{name}/metrics", params={"probe": "attention", "metric": "entropy", "source": "live"}).json()
    expected = pl.open_run(induction_run).metrics(probe="attention", metric="entropy", source="live")
    assert rows["step"] == expected["step"].tolist() and rows["value"] == pytest.approx(expected["value"].tolist())
    assert set(rows["head"]) == {0, 1}
    transitions = client.get(f"/api/runs/{name}/transitions").json()
    assert transitions["run"] == name and isinstance(transitions["transitions"], list)


def test_sample_is_the_first_probe_sequence(client, name, induction_run):
    sample = client.get(f"/api/runs/{name}/sample").json()
    assert sample["tokens"] == pl.open_run(induction_run).probe_batch().tokens[0].tolist()
    assert sample["text"].split() == [str(t) for t in sample["tokens"]]


def test_model_view_routes_answer_on_a_checkpoint(client, name, induction_run):
    arch = client.post("/api/model/architecture", json={"run": name, "step": 10}).json()
    assert (arch["n_layers"], arch["n_heads"], arch["has_mlp"], arch["source"]) == (2, 2, False, "checkpoint")
    loss = client.post("/api/model/loss", json={"run": name, "step": 20, "text": SAMPLE_IDS}).json()
    assert len(loss["loss"]) == 11 and loss["copy_positions"][5:10] == [True] * 5 and not any(loss["copy_positions"][:4])
    model = pl.open_run(induction_run).load_model(20)
    tokens = torch.tensor([[int(t) for t in SAMPLE_IDS.split()]])
    with torch.no_grad():
        expected = pl.probes.token_losses(model(tokens), tokens)[0]
    assert loss["loss"] == pytest.approx(expected.tolist(), abs=1e-5)
    attention = client.post("/api/model/attention", json={"run": name, "step": 20, "text": SAMPLE_IDS, "layer": 1, "head": 0}).json()
    pattern = torch.tensor(attention["pattern"])
    assert pattern.shape == (12, 12) and torch.allclose(pattern.sum(-1), torch.ones(12), atol=1e-3)
    assert pattern.triu(1).abs().max() == 0  # causal
    weights = client.post("/api/model/weights", json={"run": name, "step": 20, "layer": 1, "head": 0}).json()
    assert weights["space"] == "token" and len(weights["qk"]) == 64 and len(weights["ov"][0]) == 64
    gradients = client.post("/api/model/gradients", json={"run": name, "step": 20, "text": SAMPLE_IDS, "position": 3}).json()
    assert len(gradients["grad_norm"]) == 12 and all(g == 0 for g in gradients["grad_norm"][5:])  # later tokens cannot matter
    assert gradients["grad_norm"][3] > 0


def test_ablate_freeze_and_patch_change_what_they_should(client, name):
    base = {"run": name, "step": 20, "text": SAMPLE_IDS, "nodes": [{"layer": 0, "head": 1}]}
    zero = client.post("/api/model/ablate", json={**base, "mode": "zero"}).json()
    assert any(abs(d) > 1e-6 for d in zero["delta"])
    assert zero["copy_loss_change"] == pytest.approx(zero["ablated"]["copy_loss"] - zero["clean"]["copy_loss"])
    mean = client.post("/api/model/ablate", json={**base, "mode": "mean"}).json()
    assert mean["ablated"]["loss"] != zero["ablated"]["loss"]
    same = client.post("/api/model/ablate", json={**base, "mode": "freeze", "reference_text": SAMPLE_IDS}).json()
    assert same["delta"] == pytest.approx([0.0] * 11, abs=1e-5)  # frozen at its own values: nothing changes
    other = client.post("/api/model/ablate", json={**base, "mode": "freeze", "reference_text": "1 2 3 4 5 6 7 8 9 10 11 12 13"}).json()
    assert max(abs(d) for d in other["delta"]) > 1e-4
    corrupted = "6 17 42 9 33 5 17 42 9 33 5 17"
    full = client.post("/api/model/patch", json={"run": name, "step": 20, "clean_text": SAMPLE_IDS, "corrupted_text": corrupted,
                                                  "hook": "resid_pre", "layer": 0}).json()
    assert full["patched_logit_diff"] == pytest.approx(full["clean_logit_diff"], abs=1e-4)  # patching everything restores it
    assert full["answer"] != full["wrong"]
    head = client.post("/api/model/patch", json={"run": name, "step": 20, "clean_text": SAMPLE_IDS, "corrupted_text": corrupted,
                                                  "hook": "head", "layer": 1, "head": 0, "position": 11}).json()
    assert head["hook_name"] == "blocks.1.attn.hook_z"


@pytest.mark.parametrize("method, path, body, status, words", [
    ("get", "/api/runs/elsewhere/metrics", None, 404, "no run named 'elsewhere'"),
    ("get", "/api/runs/..%2F..%2Fetc%2Fpasswd/metrics", None, 404, ""),
    ("get", "/static/../session.py", None, 404, ""),
    ("get", "/static/%2e%2e/app.py", None, 404, ""),
    ("post", "/api/model/loss", {"run": "RUN", "step": 7, "text": SAMPLE_IDS}, 404, "no checkpoint at step 7"),
    ("post", "/api/model/loss", {"run": "RUN", "text": "1 2 64"}, 400, "below the vocabulary size 64"),
    ("post", "/api/model/loss", {"run": "RUN", "text": "hello"}, 400, "type token ids"),
    ("post", "/api/model/loss", {"run": "RUN", "text": " ".join(["1"] * 65)}, 400, "context holds 64"),
    ("post", "/api/model/loss", {"run": "RUN", "text": "1 " * 2500}, 422, "text"),
    ("post", "/api/model/ablate", {"run": "RUN", "text": SAMPLE_IDS, "nodes": [{"layer": 2, "head": 0}]}, 400, "layer 2 does not exist"),
    ("post", "/api/model/ablate", {"run": "RUN", "text": SAMPLE_IDS, "nodes": [{"layer": 1}]}, 400, "no MLP"),
    ("post", "/api/model/ablate", {"run": "RUN", "text": SAMPLE_IDS, "nodes": [{"layer": 1, "head": 0}], "mode": "freeze"}, 400, "reference_text"),
    ("post", "/api/model/ablate", {"run": "RUN", "text": SAMPLE_IDS, "nodes": [{"layer": 1, "head": 0}], "mode": "half"}, 422, "mode"),
    ("post", "/api/model/ablate", {"run": "RUN", "text": SAMPLE_IDS, "nodes": []}, 422, "nodes"),
    ("post", "/api/model/patch", {"run": "RUN", "clean_text": "1 2 3", "corrupted_text": "1 2"}, 400, "same number of tokens"),
    ("post", "/api/model/attention", {"run": "RUN", "text": SAMPLE_IDS, "layer": 0, "head": 5}, 400, "head 5 does not exist"),
    ("post", "/api/model/gradients", {"run": "RUN", "text": SAMPLE_IDS, "position": 11}, 400, "11 predictions"),
    ("post", "/api/model/weights", {"run": "RUN", "layer": 0, "head": 0, "path": "/etc"}, 422, "Extra inputs"),
])
def test_refused_requests_get_a_json_message_and_no_traceback(client, name, method, path, body, status, words):
    if body is not None:
        body = {k: (name if v == "RUN" else v) for k, v in body.items()}
    response = client.get(path) if method == "get" else client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error and "Traceback" not in response.text


def test_request_bodies_over_the_limit_are_refused(client, name):
    body = json.dumps({"run": name, "text": "1", "pad": "x" * 70_000}).encode()
    response = client.post("/api/model/loss", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "KiB" in response.json()["error"]


def test_page_scripts_and_bundled_plotly_are_served_without_a_cdn(client):
    page = client.get("/").text
    assert '<script src="/vendor/plotly.min.js"' in page and "http" not in page.split("<body>")[0].replace("http-equiv", "")
    assert client.get("/static/main.js").status_code == 200
    plotly = client.get("/vendor/plotly.min.js")
    assert plotly.status_code == 200 and len(plotly.content) > 1_000_000


def test_bound_beyond_localhost_every_request_needs_the_token(induction_run):
    app, token = build([induction_run], host="0.0.0.0")
    assert token and len(token) >= 20
    with TestClient(app) as client:
        refused = client.get("/api/runs")
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        assert client.get("/api/runs", params={"token": "wrong"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        page = client.get("/", params={"token": token})
        assert page.status_code == 200 and client.cookies.get("phaselens_token") == token
        assert client.get("/api/runs").status_code == 200  # the page's cookie now carries it
        with client.websocket_connect("/api/events") as socket:
            assert socket.receive_json()["type"] == "hello"
    with TestClient(app) as stranger:
        with pytest.raises(Exception):
            with stranger.websocket_connect("/api/events") as socket:
                socket.receive_json()


def test_a_model_from_the_notebook_is_shared_by_reference_and_refresh_reaches_open_pages():
    from websockets.sync.client import connect

    model = pl.build_model(pl.ModelConfig())
    handle = pl.serve(model=model)
    try:
        assert handle.url.startswith("http://127.0.0.1:")

        def post(path, body):
            request = urllib.request.Request(handle.url + path.lstrip("/"), data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(request, timeout=30))

        runs = json.load(urllib.request.urlopen(handle.url + "api/runs", timeout=30))["runs"]
        assert [(r["name"], r["kernel_model"]) for r in runs] == [("kernel", True)]
        before = post("/api/model/loss", {"run": "kernel", "text": SAMPLE_IDS})["loss"]
        uniform = [math.log(64)] * 11
        saved = model.W_U.detach().clone()
        with torch.no_grad():
            model.W_U.zero_()  # an edit in the kernel: every logit 0, so the loss is ln 64 everywhere
        assert post("/api/model/loss", {"run": "kernel", "text": SAMPLE_IDS})["loss"] == pytest.approx(uniform, abs=1e-5)
        with torch.no_grad():
            model.W_U.copy_(saved)
        model.ln_final.hook_normalized.add_hook(lambda x, hook: x * 0)  # a hook added in the kernel
        assert post("/api/model/loss", {"run": "kernel", "text": SAMPLE_IDS})["loss"] == pytest.approx(uniform, abs=1e-5)
        assert post("/api/model/loss", {"run": "kernel", "text": SAMPLE_IDS})["loss"] == pytest.approx(uniform, abs=1e-5)  # still there
        model.reset_hooks()
        assert post("/api/model/loss", {"run": "kernel", "text": SAMPLE_IDS})["loss"] == pytest.approx(before, abs=1e-6)
        with connect(handle.url.replace("http", "ws") + "api/events", open_timeout=10) as socket:
            assert json.loads(socket.recv(timeout=10))["type"] == "hello"
            handle.refresh()
            assert json.loads(socket.recv(timeout=10)) == {"type": "model_changed", "model_version": 1}
        assert '<iframe src="http://127.0.0.1:' in handle._repr_html_()
    finally:
        handle.stop()


@pytest.mark.slow
def test_ablating_the_strongest_induction_head_after_the_transition_raises_its_copy_loss_by_over_a_nat(induced_run):
    run = pl.open_run(induced_run)
    scores = run.metrics(probe="heads", metric="induction", source="checkpoint")
    last = scores[scores["step"] == 1600]
    strongest = last.loc[last["value"].idxmax()]
    assert strongest["layer"] == 1 and strongest["value"] > 0.5
    node = {"layer": int(strongest["layer"]), "head": int(strongest["head"])}
    app, _ = build([induced_run])
    with TestClient(app, base_url=LOCAL) as client:
        text = client.get(f"/api/runs/{induced_run.name}/sample").json()["text"]
        after = client.post("/api/model/ablate", json={"run": induced_run.name, "step": 1600, "text": text, "nodes": [node], "mode": "mean"}).json()
        before = client.post("/api/model/ablate", json={"run": induced_run.name, "step": 400, "text": text, "nodes": [node], "mode": "mean"}).json()
    assert after["clean"]["copy_loss"] < 1.5 < math.log(64) - 0.5 < before["clean"]["copy_loss"]
    assert after["copy_loss_change"] > 1.0  # the head formed: removing it costs the copies
    assert abs(before["copy_loss_change"]) < 0.3  # before the transition the same head did not copy


def test_the_neuron_view_shows_the_artifact_phaselens_neurons_wrote_and_only_files_inside_the_run(run_copy, tmp_path):
    from phaselens.analysis.neurons import neurons_report
    from phaselens.store.neuron_artifact import read_neuron_artifact

    app, _ = build([run_copy])
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get(f"/api/runs/{run_copy.name}/neurons").json()["available"] is False
        # the residual stream's units as "neurons": this attention-only run has no MLP
        result = neurons_report(run_copy, hook="resid_post", n_tokens=1024, top_k=4, window=8, progress=False)
        folder = run_copy / "artifacts" / "neurons"
        (folder / "z_broken.json").write_text("{not json")
        outside = tmp_path / "secret.json"
        outside.write_text(json.dumps({"firing_rate": [0.5, 0.5]}))
        (folder / "link.json").symlink_to(outside)
        report = client.get(f"/api/runs/{run_copy.name}/neurons").json()
    written = read_neuron_artifact(result.artifact)
    assert report["available"] and report["step"] == 20 and "artifacts/neurons/link.json" not in report["files"]
    assert report["problems"] == ["artifacts/neurons/z_broken.json is not valid JSON: Expecting property name enclosed in "
                                  "double quotes: line 1 column 2 (char 1)"]
    assert [(l["layer"], l["name"]) for l in report["layers"]] == [(0, "blocks.0.hook_resid_post"), (1, "blocks.1.hook_resid_post")]
    for shown, layer in zip(report["layers"], written.layers):
        assert shown["values"] == {"firing_rate": layer.firing_rate, "mean": layer.mean, "max": layer.max, "selectivity": layer.selectivity}
    neuron = report["neurons"][0]
    first = written.layers[0].most_selective[0]
    assert (neuron["layer"], neuron["neuron"]) == ("blocks.0.hook_resid_post", first.neuron)
    context = neuron["contexts"][0]
    assert context["token"] and context["before"]  # the text around the activation, not an empty string
    stream = written.stream_tokens  # token ids, shown as "5 17 42 "
    position = first.contexts[0].position
    assert context["token"] == f"{stream[position]} " and context["before"].split() == [str(t) for t in stream[position - 8:position]]
