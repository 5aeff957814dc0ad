"""The dashboard server on hostile or broken input: each case once gave a 500, leaked a path, let a
foreign page in, or let one broken run take the others down. The corpus only grows."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from phaselens.server import build

LOCAL = "http://127.0.0.1:8050"


def damage(store) -> None:
    data = bytearray(store.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = b"\xff" * 4096
    store.write_bytes(bytes(data))


@pytest.fixture
def three_runs(induction_run, tmp_path):
    """A good run, one with a damaged metrics.sqlite, one whose run.json is not JSON."""
    runs = {}
    for name in ("good", "bad-store", "bad-json"):
        runs[name] = tmp_path / name
        shutil.copytree(induction_run, runs[name])
    damage(runs["bad-store"] / "metrics.sqlite")
    (runs["bad-json"] / "run.json").write_text("{not json")
    return runs


def test_one_broken_run_is_listed_with_its_reason_and_the_others_are_served(three_runs):
    app, _ = build(list(three_runs.values()))
    with TestClient(app, base_url=LOCAL) as client:
        response = client.get("/api/runs")
        assert response.status_code == 200, response.text
        runs = {r["name"]: r for r in response.json()["runs"]}
        assert runs["good"]["status"] == "finished" and runs["good"]["error"] is None and runs["good"]["checkpoints"] == [0, 10, 20]
        assert runs["bad-store"]["status"] == "unreadable" and "metrics.sqlite is damaged" in runs["bad-store"]["error"]
        assert runs["bad-json"]["status"] == "unreadable" and "not valid JSON" in runs["bad-json"]["error"]
        assert client.get("/api/runs/good/series").status_code == 200
        assert client.get("/api/runs/bad-store/series").status_code == 400


def test_a_missing_run_json_is_listed_not_fatal_and_no_store_is_created(induction_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(induction_run, broken)
    (broken / "run.json").unlink()
    (broken / "metrics.sqlite").unlink()
    app, _ = build([induction_run, broken])
    with TestClient(app, base_url=LOCAL) as client:
        runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
        assert runs[induction_run.name]["error"] is None and "run.json is missing" in runs["broken"]["error"]
        client.get("/api/runs/broken/metrics")
    assert not (broken / "metrics.sqlite").exists()  # a reader never creates a store


def test_errors_name_files_relative_to_the_run_never_by_absolute_server_paths(run_copy):
    (run_copy / "checkpoints" / "step_00000010" / "model.safetensors").write_bytes(b"garbage")
    app, token = build([run_copy], host="0.0.0.0")
    with TestClient(app) as client:
        response = client.post("/api/model/architecture", json={"run": run_copy.name, "step": 10}, headers={"Authorization": f"Bearer {token}"})
    error = response.json()["error"]
    assert response.status_code == 400 and "is corrupt" in error
    assert f"{run_copy.name}/checkpoints/step_00000010/model.safetensors" in error and str(run_copy.parent) not in error


def test_a_non_ascii_token_is_refused_with_401(induction_run):
    app, _ = build([induction_run], host="0.0.0.0")
    with TestClient(app) as client:
        assert client.get("/api/runs", params={"token": "jetön"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer jetön".encode()}).status_code == 401


def test_a_huge_integer_in_a_query_string_is_a_400(induction_run):
    app, _ = build([induction_run])
    with TestClient(app, base_url=LOCAL) as client:
        response = client.get(f"/api/runs/{induction_run.name}/metrics", params={"layer": 10**30})
    assert response.status_code == 400 and "out of range" in response.json()["error"]


@pytest.mark.parametrize("host", ["evil.example:8050", "attacker.com"])
def test_on_loopback_a_foreign_host_header_is_refused(induction_run, host):
    app, _ = build([induction_run])
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get("/api/runs").status_code == 200
        for local in ("localhost:8050", "127.0.0.1", "[::1]:8050"):
            assert client.get("/api/runs", headers={"Host": local}).status_code == 200
        refused = client.get("/api/runs", headers={"Host": host})
    assert refused.status_code == 403 and "DNS-rebinding" in refused.json()["error"]


def test_on_loopback_a_websocket_from_a_foreign_origin_is_refused(induction_run):
    from starlette.websockets import WebSocketDisconnect

    app, _ = build([induction_run])
    with TestClient(app, base_url=LOCAL) as client:
        with client.websocket_connect("ws://127.0.0.1:8050/api/events", headers={"Origin": "http://127.0.0.1:8050"}) as socket:
            assert socket.receive_json()["type"] == "hello"
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("ws://127.0.0.1:8050/api/events", headers={"Origin": "http://evil.example"}) as socket:
                socket.receive_json()
        assert client.post("/api/model/loss", json={"run": induction_run.name, "text": "1 2 3"},
                           headers={"Origin": "http://evil.example"}).status_code == 403


def test_bound_beyond_loopback_the_token_not_the_host_decides(induction_run):
    app, token = build([induction_run], host="0.0.0.0")
    with TestClient(app) as client:  # any Host: the machine's name or address on the network
        assert client.get("/api/runs", headers={"Host": "lab-box:8050", "Authorization": f"Bearer {token}"}).status_code == 200


def test_an_impossible_port_is_refused_before_anything_is_announced():
    from phaselens.errors import ConfigError
    from phaselens.server import run_forever

    announced = []
    with pytest.raises(ConfigError, match="99999"):
        run_forever([], port=99999, announce=announced.append)
    assert announced == []


def test_an_artifact_that_is_not_json_does_not_hide_the_run(run_copy):
    folder = run_copy / "artifacts" / "neurons"
    folder.mkdir(parents=True)
    (folder / "step_00000020.json").write_text(json.dumps({"format": "something else"}))
    app, _ = build([run_copy])
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get("/api/runs").status_code == 200
        assert client.get(f"/api/runs/{run_copy.name}/neurons").status_code == 200


# ---------------------------------------------------------------------------- issue 27: injection's second wall, links out of a run

def test_every_response_carries_a_strict_content_security_policy(induction_run):
    app, _ = build([induction_run])
    with TestClient(app, base_url=LOCAL) as client:
        for path in ("/", "/static/main.js", "/api/runs"):
            policy = client.get(path).headers.get("content-security-policy", "")
            directives = dict(d.strip().split(" ", 1) for d in policy.split(";") if d.strip())
            assert directives.get("script-src") == "'self'", (path, policy)  # no inline script, no eval, no other origin
            assert directives.get("default-src") == "'none'" and directives.get("object-src", "'none'") == "'none'"


def test_a_checkpoint_linked_from_outside_the_run_is_refused_as_json_and_the_others_are_served(induction_run, tmp_path):
    linked, good = tmp_path / "linked", tmp_path / "good"
    for run in (linked, good):
        shutil.copytree(induction_run, run)
    shutil.copytree(induction_run / "checkpoints" / "step_00000020", tmp_path / "elsewhere" / "step_00000020")
    (linked / "checkpoints" / "step_00000030").symlink_to(tmp_path / "elsewhere" / "step_00000020", target_is_directory=True)
    app, _ = build([linked, good])
    with TestClient(app, base_url=LOCAL) as client:
        runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
        assert "outside the run" in runs["linked"]["error"] and "step_00000030" in runs["linked"]["error"]
        for response in (client.post("/api/model/architecture", json={"run": "linked", "step": 30}),
                         client.post("/api/model/loss", json={"run": "linked", "step": 20, "text": "1 2 3"})):
            assert 400 <= response.status_code < 500, response.text
            assert "outside the run" in response.json()["error"] and str(tmp_path) not in response.json()["error"]
        assert client.post("/api/model/architecture", json={"run": "good", "step": 20}).status_code == 200


def test_a_fifo_as_the_probe_batch_is_a_4xx_not_a_request_that_hangs(run_copy):
    import os
    import urllib.error
    import urllib.request

    import phaselens as pl

    (run_copy / "probe_batch.safetensors").unlink()
    os.mkfifo(run_copy / "probe_batch.safetensors")
    handle = pl.serve(run=[run_copy])  # a real server: a request that hangs times out here instead of hanging the test
    try:
        ablate = json.dumps({"run": run_copy.name, "step": 20, "text": "1 2 3 4", "nodes": [{"layer": 0, "head": 0}], "mode": "mean"})
        for request in (urllib.request.Request(f"{handle.url}api/runs/{run_copy.name}/sample"),
                        urllib.request.Request(f"{handle.url}api/model/ablate", data=ablate.encode(),
                                               headers={"Content-Type": "application/json"})):
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, timeout=60)
            assert 400 <= answer.value.code < 500 and "not a regular file" in json.loads(answer.value.read())["error"]
    finally:
        handle.stop()


def test_a_request_behind_a_computation_that_hangs_is_refused_after_a_bounded_wait(induction_run):
    import threading
    import time

    app, _ = build([induction_run])
    session = app.state.session
    session.lock.wait = 0.5
    holding, release = threading.Event(), threading.Event()

    def hang():  # what a mean ablation blocked on a FIFO once did: hold the model lock forever
        with session.lock:
            holding.set()
            release.wait(30)

    threading.Thread(target=hang, daemon=True).start()
    holding.wait(10)
    try:
        with TestClient(app, base_url=LOCAL) as client:
            began = time.monotonic()
            response = client.post("/api/model/architecture", json={"run": induction_run.name, "step": 20})
            assert response.status_code == 503 and "busy" in response.json()["error"] and time.monotonic() - began < 10
            assert client.get("/api/runs").status_code == 200  # what needs no model is served meanwhile
            release.set()
            assert client.post("/api/model/architecture", json={"run": induction_run.name, "step": 20}).status_code == 200
    finally:
        release.set()


# ---------------------------------------------------------------------------- issue 27: NaN weights, deep JSON, token forms

def test_a_checkpoint_of_nan_weights_is_a_4xx_naming_it_not_200_with_nan_losses(run_copy):
    import torch
    from safetensors.torch import load_file, save_file

    weights = run_copy / "checkpoints" / "step_00000010" / "model.safetensors"
    save_file({name: torch.full_like(t, float("nan")) for name, t in load_file(str(weights)).items()}, str(weights))
    app, _ = build([run_copy])
    with TestClient(app, base_url=LOCAL) as client:
        for path, body in (("loss", {"text": "1 2 3"}), ("architecture", {})):
            response = client.post(f"/api/model/{path}", json={"run": run_copy.name, "step": 10, **body})
            assert 400 <= response.status_code < 500, response.text
            error = response.json()["error"]
            assert "NaN or infinite weights" in error and "step_00000010/model.safetensors" in error
        assert client.post("/api/model/loss", json={"run": run_copy.name, "step": 20, "text": "1 2 3"}).status_code == 200


def test_a_neuron_artifact_nested_too_deeply_is_named_not_a_500(run_copy):
    folder = run_copy / "artifacts" / "neurons"
    folder.mkdir(parents=True)
    (folder / "step_00000020.json").write_text("[" * 100_000)
    app, _ = build([run_copy])
    with TestClient(app, base_url=LOCAL) as client:
        response = client.get(f"/api/runs/{run_copy.name}/neurons")
        assert response.status_code < 500, response.text
        assert any("step_00000020.json is not valid JSON: nested too deeply" in p for p in response.json()["problems"])


def test_the_token_is_taken_from_the_query_the_cookie_or_a_bearer_header_and_nothing_else(induction_run):
    app, token = build([induction_run], host="0.0.0.0")
    with TestClient(app) as client:
        for header in (f"Bearer {token}", f"bearer {token}", f"Bearer  {token} "):
            assert client.get("/api/runs", headers={"Authorization": header}).status_code == 200, header
        for header in (token, f"Basic {token}", "Bearer", f"Token {token}", f"Bearer{token}"):
            refused = client.get("/api/runs", headers={"Authorization": header})
            assert refused.status_code == 401 and "Authorization: Bearer TOKEN" in refused.json()["error"], header
        assert client.get("/api/runs", params={"token": token}).status_code == 200  # and the page's cookie, set by it
        assert client.get("/api/runs").status_code == 200
    with TestClient(app) as fresh:
        assert fresh.get("/api/runs").status_code == 401
