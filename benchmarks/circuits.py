"""The `circuits` probe's edge scores: EAP and EAP-IG for every edge against exact patching of every edge,
side by side in one process, per checkpoint, on two graphs.

    demo    the demo model (2 layers × 2 heads, attention only: 29 edges): the checkpoints of `--run` (a trained
            induction run, e.g. runs/demo) spread over it, or, without `--run`, the induction preset's model with
            random weights; the pairs are the probe's own (the run's induction batch and the study's options,
            `--rows` sequences; without a run, the same construction drawn here)
    big     a 4-layer, 8-head model with MLPs (d_model 64, d_mlp 256: 1,519 edges), random weights, on
            `--big-rows` sequences of the same construction

Each method is timed as the probe runs it, from tokens to one score per edge (`EdgeGraph.exact`,
`EdgeGraph.attribution` with 1 step and with `--steps`), wall-clock and process CPU time, after a warm-up.
Exact patching runs one patched forward per edge (batched as replicas, `--chunk` sequences per forward), so
its cost grows with the edge count; EAP is one clean forward + backward and one corrupt forward, EAP-IG m
forwards + backwards, whatever the edge count: the script counts the model's forward calls and the sequences
they carry for each method and says so (`passes`). With `--exact-sample N` exact patches a random sample of N
edges of the big graph and its time is scaled by edges / N (`big_exact_scaled: true`); by default it patches all.
Spearman rank correlations of EAP and EAP-IG with exact are reported per graph. The last line is JSON; its
top-level figures (`exact_s`, `eap_s`, `eap_ig_s`, `ratio_exact_vs_eap`, `edges`) are the big graph's.

    .venv/bin/python benchmarks/circuits.py [--run runs/demo] [--checkpoints 2] [--rows 32] [--big-rows 4]
                                            [--steps 5] [--chunk 2048] [--big-chunk 2048] [--threads 1]
                                            [--exact-sample 0] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from phaselens.models.config import ModelConfig
from phaselens.models.transformer import Transformer
from phaselens.probes.circuits import study_pairs
from phaselens.analysis.circuits import spearman
from phaselens.probes.edge_graph import EdgeGraph, Pairs
from phaselens.tasks.induction import induction_probe_batch
from phaselens.training.config import load_config

BIG = {"n_layers": 4, "n_heads": 8, "d_model": 64, "d_mlp": 256}


def demo_config(**changes: Any) -> ModelConfig:
    """The induction preset's model shape, with `changes`."""
    spec = load_config("induction").model
    return ModelConfig(**{**{k: getattr(spec, k) for k in ("n_layers", "n_heads", "d_model", "d_mlp", "d_vocab", "n_ctx",
                                                          "normalization")}, **changes})


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def drawn_pairs(cfg: ModelConfig, rows: int, seed: int = 0) -> Pairs:
    """The induction study's pairs drawn for a model without a run: first copy replaced by fresh tokens, copy loss read."""
    ids = list(range(cfg.d_vocab))
    batch = induction_probe_batch(ids, cfg.n_ctx, rows, torch.Generator().manual_seed(seed))
    return study_pairs(batch, "source", "copy", ids, seed=seed)


def run_pairs(path: Path, rows: int) -> tuple[Any, list[int], Pairs]:
    """A run, its checkpoint steps, and the circuits probe's own pairs on it (its plan's batch and options)."""
    import phaselens as pl
    from phaselens.models.adapter import adapter_for

    run = pl.open_run(path)
    planned = run.plan(["circuits"], writable=False).require().probes[0]
    o = planned.make().options  # the plan's options over the probe's defaults
    batch = run.probe_batches()[planned.batch]
    steps = run.checkpoint_steps()
    ids = adapter_for(run.load_model(steps[-1])).tokenizer.ordinary_ids()
    return run, steps, study_pairs(batch, o["patch"], o["read"], ids, o["seed"], rows, o["corrupt"])


class Passes:
    """Counts a graph's forwards (calls of its embedding output's hook point), the sequences they carry, and those
    run with autograd on (each followed by one backward)."""

    def __init__(self, graph: EdgeGraph):
        self.calls = self.sequences = self.with_grad = 0
        self.handle = graph.adapter.hook_points[graph.sites.embed_out].register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: tuple) -> None:
        self.calls += 1
        self.sequences += int(args[0].shape[0])
        self.with_grad += torch.is_grad_enabled()

    def __enter__(self) -> "Passes":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def on(pairs: Pairs, device: torch.device) -> Pairs:
    return Pairs(pairs.clean.to(device), pairs.corrupt.to(device), pairs.read.to(device))


def timed(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """`call()`, its wall-clock and process CPU seconds (waiting for the device's work to finish)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    began, began_cpu = time.perf_counter(), time.process_time()
    out = call()
    sync()
    return out.cpu(), time.perf_counter() - began, time.process_time() - began_cpu


def measure(model: torch.nn.Module, pairs: Pairs, steps: int, chunk: int, sample: int = 0) -> dict[str, Any]:
    """Every method's scores of every edge of `model`'s graph on `pairs`: seconds, CPU seconds, passes, agreement."""
    graph = EdgeGraph(model)
    E = len(graph)
    picked = torch.randperm(E, generator=torch.Generator().manual_seed(0))[:sample].sort().values if 0 < sample < E else None
    B = pairs.clean.shape[0]

    def exact() -> torch.Tensor:
        if picked is None:
            return graph.exact(pairs, rows=chunk)
        corrupt_out, _ = graph.outputs(pairs.corrupt)
        clean = pairs.loss(graph.outputs(pairs.clean)[1])[0]
        patch = torch.zeros(len(picked), E, device=corrupt_out.device)
        patch[torch.arange(len(picked)), picked] = 1
        return torch.cat([graph.patched_loss(pairs, corrupt_out, p) for p in patch.split(graph._chunk(pairs, chunk))]) - clean

    calls = {"exact": exact, "eap": lambda: graph.attribution(pairs, steps=1), "eap_ig": lambda: graph.attribution(pairs, steps=steps)}
    out: dict[str, Any] = {"edges": E, "sequences": B, "passes": {}}
    scores = {}
    for method, call in calls.items():
        with Passes(graph) as passes:
            scores[method], out[f"{method}_s"], out[f"{method}_cpu_s"] = timed(call)
        out["passes"][method] = {"forwards": passes.calls, "backwards": passes.with_grad, "sequences": passes.sequences}
    if picked is not None:
        out["exact_measured_edges"] = len(picked)
        out["exact_s"], out["exact_cpu_s"] = out["exact_s"] * E / len(picked), out["exact_cpu_s"] * E / len(picked)
    measured = picked if picked is not None else slice(None)
    for method in ("eap", "eap_ig"):  # the rank correlation the probe reports (`analysis.circuits.spearman`)
        out[f"spearman_{method}_vs_exact"] = spearman(scores[method][measured].numpy(), scores["exact"].numpy())
    return out


def summarise(name: str, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over checkpoints of each figure (seconds per checkpoint); the passes and edge count of the first (they do not vary)."""
    keys = [k for k in cases[0] if k.endswith("_s") or k.startswith("spearman")]
    merged = {k: round(float(np.mean([c[k] for c in cases])), 4) for k in keys}
    merged.update(edges=cases[0]["edges"], sequences=cases[0]["sequences"], passes=cases[0]["passes"], checkpoints=len(cases))
    merged["ratio_exact_vs_eap"] = round(merged["exact_s"] / merged["eap_s"], 2)
    merged["ratio_exact_vs_eap_ig"] = round(merged["exact_s"] / merged["eap_ig_s"], 2)
    for k in ("exact_measured_edges",):
        if k in cases[0]:
            merged[k] = cases[0][k]
    print(f"{name}: {merged['edges']} edges, {merged['sequences']} sequences, {len(cases)} checkpoint(s): exact "
          f"{merged['exact_s']:.3f} s, EAP {merged['eap_s']:.3f} s, EAP-IG {merged['eap_ig_s']:.3f} s (exact / EAP "
          f"{merged['ratio_exact_vs_eap']:.1f}×); Spearman vs exact: EAP {merged['spearman_eap_vs_exact']:.2f}, "
          f"EAP-IG {merged['spearman_eap_ig_vs_exact']:.2f}; forwards: " +
          ", ".join(f"{m} {p['forwards']} ({p['sequences']} sequences)" for m, p in merged["passes"].items()))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained induction run (default: the preset model with random weights)")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints of --run measured, spread over it, the last included")
    parser.add_argument("--rows", type=int, default=32, help="sequences of the demo model's pairs (the probe's default)")
    parser.add_argument("--big-rows", type=int, default=4, help="sequences of the big model's pairs")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation steps")
    parser.add_argument("--chunk", type=int, default=2048, help="sequences per batched patched forward (the probe's default)")
    parser.add_argument("--big-chunk", type=int, default=2048, help="big graph: sequences per patched forward (the probe's default)")
    parser.add_argument("--exact-sample", type=int, default=0, help="big graph: exact on this many sampled edges, scaled (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (the models and pairs are moved there)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 sequences, the big graph's exact on 40 sampled edges")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.big_rows, args.checkpoints, args.exact_sample = 2, 2, 1, args.exact_sample or 40
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.run:
        run, steps, pairs = run_pairs(args.run, args.rows)
        picked = sorted({steps[int(round(i))] for i in np.linspace(len(steps) - 1, 0, max(1, args.checkpoints))})
        models = [(step, run.load_model(step).eval().to(device)) for step in picked]
        source = str(args.run)
    else:
        cfg = demo_config()
        models, pairs, source = [(None, random_model(cfg).to(device))], drawn_pairs(cfg, args.rows), "induction preset, random weights"
    pairs = on(pairs, device)
    measure(models[0][1], pairs, args.steps, args.chunk)  # warm-up: first calls set up autograd and the kernels
    cases = [measure(model, pairs, args.steps, args.chunk) for _, model in models]
    demo = summarise(f"demo ({source})", cases)
    demo["steps_measured"] = [step for step, _ in models]
    demo["spearman_by_step"] = {str(step): {m: round(c[f"spearman_{m}_vs_exact"], 3) for m in ("eap", "eap_ig")}
                                for (step, _), c in zip(models, cases)}
    big_cfg = demo_config(**BIG)
    big = summarise("big (4 layers × 8 heads, MLPs, random weights)",
                    [measure(random_model(big_cfg).to(device), on(drawn_pairs(big_cfg, args.big_rows), device), args.steps, args.big_chunk,
                             args.exact_sample)])
    print(json.dumps({"benchmark": "circuits", "exact_s": big["exact_s"], "eap_s": big["eap_s"], "eap_ig_s": big["eap_ig_s"],
                      "ratio_exact_vs_eap": big["ratio_exact_vs_eap"], "edges": big["edges"],
                      "big_exact_scaled": "exact_measured_edges" in big, "demo": demo, "big": big, "demo_source": source,
                      "eap_ig_steps": args.steps, "chunk": args.chunk, "big_chunk": args.big_chunk, "threads": args.threads,
                      "device": str(device)}))


if __name__ == "__main__":
    main()
