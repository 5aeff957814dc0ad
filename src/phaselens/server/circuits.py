"""The circuit view's routes: the `circuits` probe's graph at a checkpoint, and one edge patched live.

    GET  /api/runs/{run}/circuits            the checkpoint steps the probe measured
    GET  /api/runs/{run}/circuits/{step}     nodes (in layer columns) and edges with their stored scores
    POST /api/circuits/patch                 {run, step, edge}: that edge patched clean -> corrupt on the loaded checkpoint

A live patch uses the pairs the stored scores were measured on (the artifact's `pairs` record: the study's
position sets, corruption, seed and rows, on the batch the run's measurement plan routes the probe to), so
its metric change is the stored exact score recomputed, and it can be set beside EAP and EAP-IG's estimates.
A checkpoint the probe never measured is patched on the pairs the plan would measure it with.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from phaselens.errors import PhaselensError
from phaselens.server import schemas as s
from phaselens.server.routes import finite
from phaselens.server.session import KERNEL, BadInput, NotFound, Session
from phaselens.store.circuit_artifact import graph_columns, node_kind


def graph_nodes(edges: list[Any]) -> list[s.CircuitNode]:
    """The nodes of a circuit graph, each in its column (`store.circuit_artifact.graph_columns`), left to right:
    embed, layer 0's heads, its MLP (where it has one), layer 1's heads, ..., logits."""
    names = {"embed", "logits"} | {e.upstream for e in edges} | {e.downstream for e in edges}
    nodes = [s.CircuitNode(name=name, kind=kind, layer=layer, head=head, column=column)
             for name, (column, _) in graph_columns(names).items() for kind, layer, head in [node_kind(name)]]
    return sorted(nodes, key=lambda n: (n.column, n.head if n.head is not None else -1))


def circuits_router(session: Session) -> APIRouter:
    router = APIRouter(prefix="/api")

    def artifact(run: str, step: int):
        return session.run(run).circuit(step)

    @router.get("/runs/{run}/circuits", response_model=s.CircuitSteps)
    def steps(run: str):
        if run == KERNEL and session.model_run == KERNEL:
            return s.CircuitSteps(run=run, steps=[])  # a notebook's model has no checkpoints to have measured
        return s.CircuitSteps(run=run, steps=session.run(run).circuit_steps())

    @router.get("/runs/{run}/circuits/{step}", response_model=s.CircuitGraph)
    def graph(run: str, step: int):
        found = artifact(run, step)
        if found is None:
            measured = session.run(run).circuit_steps()
            raise NotFound(f"the circuits probe has not measured run {run!r} at step {step}" +
                           (f"; it measured steps {', '.join(map(str, measured))}" if measured
                            else f"; measure it with: phaselens probe {run} --probes circuits"))
        edges = [s.CircuitEdge(edge=e.edge, upstream=e.upstream, downstream=e.downstream, input=e.input,
                               scores={m: finite(v) for m, v in e.scores.items()}, in_circuit=e.in_circuit) for e in found.edges]
        return s.CircuitGraph(run=run, step=step, methods=found.methods, circuit_method=found.circuit_method,
                              threshold=found.threshold, metric_clean=finite(found.metric_clean),
                              metric_corrupt=finite(found.metric_corrupt), faithfulness=finite(found.faithfulness),
                              pairs={k: v for k, v in found.pairs.items() if isinstance(v, (str, int, float))},
                              nodes=graph_nodes(found.edges), edges=edges)

    @router.post("/circuits/patch", response_model=s.EdgePatchResponse)
    def patch(request: s.EdgePatchRequest):
        handle = session.run(request.run)
        stored = handle.circuit(request.step)
        with session.lock:
            model, _ = session.model_for(request.run, request.step)
            result = patch_edge(handle, model, request.edge, stored)
        score = stored_scores(stored, request.edge)
        return s.EdgePatchResponse(run=request.run, step=request.step, edge=request.edge, **result,
                                   stored=score, in_circuit=any(e.edge == request.edge and e.in_circuit for e in stored.edges)
                                   if stored is not None else None)

    return router


def stored_scores(stored, edge: str) -> dict[str, float | None]:
    """The artifact's scores of `edge` by method (empty when the checkpoint was not measured)."""
    if stored is None:
        return {}
    return next(({m: finite(v) for m, v in e.scores.items()} for e in stored.edges if e.edge == edge), {})


def pair_options(run, stored) -> dict[str, Any]:
    """How the pairs are built: as the stored scores were (their artifact's record), else as the run's plan would."""
    record = stored.pairs if stored is not None else {}
    try:
        planned = next(iter(run.plan(["circuits"], writable=False).require("circuits").probes))
        options, batch = dict(planned.options), planned.batch
    except PhaselensError as exc:
        if not (record.get("patch") and record.get("read")):
            raise BadInput(f"this run cannot be measured by the circuits probe: {exc}") from None
        options, batch = {}, None  # a run whose study declares no pairs (an own loop): the stored record says them, on its probe batch
    options = {"patch": options.get("patch"), "read": options.get("read"), "seed": options.get("seed", 0),
               "rows": options.get("rows", 32), "corrupt": options.get("corrupt", "fresh")}
    options.update({k: record[k] for k in ("patch", "read", "seed", "corrupt") if k in record})
    options["rows"] = record.get("rows", record.get("sequences", options["rows"]))
    return {**options, "batch": batch}


def patch_edge(run, model, edge: str, stored) -> dict[str, Any]:
    """Patch `edge` alone to corrupt on the study's pairs: {metric_clean, metric_corrupt, metric_patched, change, sequences}."""
    import torch

    from phaselens.probes.circuits import study_pairs
    from phaselens.probes.edge_graph import EdgeGraph

    graph = EdgeGraph(model)  # a model without a graph (BDH) is refused by the adapter, as a 400
    if edge not in graph.index:
        raise BadInput(f"no edge {edge!r} in this model's graph ({len(graph)} edges, named like {graph.names[0]!r} "
                       f"or {graph.names[-1]!r})")
    options = pair_options(run, stored)
    batch = run.probe_batches().get(options["batch"]) or run.probe_batch()
    with torch.inference_mode(False):
        pairs = study_pairs(batch.to(model.device), options["patch"], options["read"], model.tokenizer.ordinary_ids(),
                            options["seed"], options["rows"], options["corrupt"])
        corrupt_out, corrupt_logits = graph.outputs(pairs.corrupt)
        _, clean_logits = graph.outputs(pairs.clean)
        one = torch.zeros(1, len(graph), device=corrupt_out.device)
        one[0, graph.index[edge]] = 1  # replica 0 patches this edge only
        patched = graph.patched_loss(pairs, corrupt_out, one)[0]
        clean, corrupt = pairs.loss(clean_logits)[0], pairs.loss(corrupt_logits)[0]
    return {"metric_clean": float(clean), "metric_corrupt": float(corrupt), "metric_patched": float(patched),
            "change": float(patched - clean), "sequences": int(pairs.clean.shape[0]), "read": options["read"],
            "patch": options["patch"]}
