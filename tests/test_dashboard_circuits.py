"""The circuit view's API (server/circuits.py): the graph the circuits probe stored at a checkpoint, and one
edge patched live on that checkpoint, whose metric change is the stored exact score recomputed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from phaselens.posthoc.runner import run_probes
from phaselens.server.app import create_app
from phaselens.server.session import Session

MEASURED = [10, 20]  # the checkpoints the circuits probe measures here; step 0 is a checkpoint it leaves out


def measured_copy(induction_run: Path, folder: Path) -> Path:
    """A copy of the 20-step induction run with the circuits probe run on two of its checkpoints (8 sequences)."""
    path = folder / "circuits_run"
    shutil.copytree(induction_run, path)
    run_probes(path, probes=["circuits"], steps=MEASURED, progress=False, options={"circuits": {"rows": 8}})
    return path


@pytest.fixture(scope="module")
def client(induction_run, tmp_path_factory):
    path = measured_copy(induction_run, tmp_path_factory.mktemp("circuits_api"))
    return TestClient(create_app(Session([path]), local_only=False)), path.name


def test_the_graph_lists_the_measured_steps_and_draws_every_edge_in_layer_columns(client):
    api, run = client
    assert api.get(f"/api/runs/{run}/circuits").json()["steps"] == MEASURED
    graph = api.get(f"/api/runs/{run}/circuits/20").json()
    assert len(graph["edges"]) == 29 and set(graph["methods"]) == {"exact", "eap", "eap_ig"}
    columns = {n["name"]: n["column"] for n in graph["nodes"]}
    assert columns["embed"] == 0 and columns["L0H1"] == 1 and columns["L1H0"] == 2 and columns["logits"] == 3
    assert {e["input"] for e in graph["edges"]} == {"q", "k", "v", "logits"}


def test_patching_an_edge_live_recomputes_its_stored_exact_score(client):
    api, run = client
    graph = api.get(f"/api/runs/{run}/circuits/20").json()
    strongest = max(graph["edges"], key=lambda e: abs(e["scores"]["exact"]))
    answer = api.post("/api/circuits/patch", json={"run": run, "step": 20, "edge": strongest["edge"]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["stored"] == strongest["scores"] and body["sequences"] == 8 and body["read"] == "copy"
    assert body["change"] == pytest.approx(strongest["scores"]["exact"], abs=1e-5)
    assert body["change"] == pytest.approx(body["metric_patched"] - body["metric_clean"], abs=1e-6)
    assert body["metric_clean"] == pytest.approx(graph["metric_clean"], abs=1e-5)


def test_a_checkpoint_the_probe_did_not_measure_is_patched_on_the_plans_pairs_without_stored_scores(client):
    api, run = client
    body = api.post("/api/circuits/patch", json={"run": run, "step": 0, "edge": "L0H1->L1H0.k"}).json()
    assert body["stored"] == {} and body["in_circuit"] is None and body["patch"] == "source"
    missing = api.get(f"/api/runs/{run}/circuits/0")
    assert missing.status_code == 404 and "measured steps 10, 20" in missing.json()["error"]


@pytest.mark.parametrize("request_body, status, words", [
    ({"step": 20, "edge": "L0H1->L7H0.k"}, 400, "no edge 'L0H1->L7H0.k'"),
    ({"step": 20, "edge": "<img src=x onerror=alert(1)>"}, 400, "no edge"),
    ({"step": 15, "edge": "L0H1->L1H0.k"}, 404, "no checkpoint at step 15"),
    ({"step": -1, "edge": "L0H1->L1H0.k"}, 422, "step"),
    ({"step": 20, "edge": ""}, 422, "edge"),
])
def test_bad_requests_get_one_clear_json_error(client, request_body, status, words):
    api, run = client
    answer = api.post("/api/circuits/patch", json={"run": run, **request_body})
    assert answer.status_code == status and words in answer.json()["error"], answer.text
    assert "Traceback" not in answer.text


def test_an_unknown_run_is_a_404(client):
    api, _ = client
    assert api.get("/api/runs/nope/circuits").status_code == 404
    assert api.post("/api/circuits/patch", json={"run": "nope", "step": 0, "edge": "L0H1->L1H0.k"}).status_code == 404


def test_a_notebook_model_without_a_run_has_no_measured_steps():
    from phaselens.models.config import ModelConfig
    from phaselens.models.transformer import Transformer

    model = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=16, d_vocab=16, n_ctx=16)).eval()
    api = TestClient(create_app(Session(model=model), local_only=False))
    assert api.get("/api/runs/kernel/circuits").json()["steps"] == []


def test_a_model_with_mlps_gets_a_column_per_layers_heads_and_one_per_its_mlp():
    import torch

    from phaselens.models.config import ModelConfig
    from phaselens.models.transformer import Transformer
    from phaselens.probes.edge_graph import EdgeGraph
    from phaselens.server.circuits import graph_nodes

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_mlp=32, d_vocab=16, n_ctx=16)).eval()
    columns = {n.name: (n.column, n.kind) for n in graph_nodes(EdgeGraph(model).edges)}
    assert columns == {"embed": (0, "embed"), "L0H0": (1, "head"), "L0H1": (1, "head"), "L0M": (2, "mlp"),
                       "L1H0": (3, "head"), "L1H1": (3, "head"), "L1M": (4, "mlp"), "logits": (5, "logits")}
