"""The `llc` probe's SGLD chains: all C chains batched in one vmapped forward/backward per step,
against the same chains run one after another (as a per-chain sampler does), in one process.

Both ways run the same chains (same minibatches, same noise: each chain has its own seeded
generators), so they give the same λ̂; the script checks that. It measures λ̂ on a few of the
demo model's checkpoints with C = 8 chains and the probe's other default settings, on one torch
thread (what a post-hoc worker uses). Wall-clock and process CPU time are both reported: on a
shared machine the CPU-time ratio is the steadier one.

It also times one SGLD step by its parts (median over `--profile-steps` steps, in ms): the batched
step, the sequential step, and outside the model the minibatch indexing, the noise and the update.
And it measures the bound any batching of the chains can reach: the same C·m sequences in ONE plain
forward/backward with shared weights (the fewest kernels and the largest matmuls the work allows),
against C one-chain forward/backwards of m sequences each; `ideal_ratio` is the second over the
first. Batched chains cannot beat that (they do the same arithmetic, with C weight sets), so when it
is near 1 the chains are compute-bound and batching has little left to save.

Per-component case: the weight-refined LLC of every head at the last measured checkpoint, all heads'
chains in one batched step (H·C chains: `LLCEstimator.estimate_components`) against the same chains one
head after another (H runs of C batched chains); `ratio_components_batched_vs_sequential` is the second
over the first, and the script checks both give the same traces. The last line is JSON.

    .venv/bin/python benchmarks/llc.py [--run runs/demo] [--checkpoints 3] [--chains 8] [--threads 1]
                                       [--option batch_size=1] [--profile-steps 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import phaselens as pl
from phaselens.probes.base import make_probe
from phaselens.probes.llc import LLCEstimator
from phaselens.run_files import ensure_run_files


def short_run(folder: Path) -> Path:
    """The demo model trained 300 steps (checkpoints 0, 100, 200, 300): same shapes, quick to make."""
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    path = folder / "demo"
    train(load_config("induction", ["train.steps=300", "train.checkpoint_every=100", "telemetry.every=50", "name=demo"]), path,
          progress=False)
    return path


def median_ms(call: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall and process CPU time of `call()` over `reps` calls after one warm-up, in ms."""
    call()
    wall, cpu = [], []
    for _ in range(reps):
        began, began_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return 1000 * float(np.median(wall)), 1000 * float(np.median(cpu))


def step_profile(estimator: LLCEstimator, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """One SGLD step's parts at w* (wall and CPU ms, medians), and the one-forward/backward bound on batching the chains."""
    o = estimator.options
    C, P = o.chains, estimator.w_star.numel()
    rows_rng, noise_rng = estimator._generators()
    w = estimator.w_star.repeat(C, 1)  # (C, P)
    rows = estimator.minibatch(rows_rng)  # each (C, m, ...)
    noise = torch.empty(C, P)
    half_epsilon, gamma, root_epsilon = (torch.full((C, 1), v) for v in (o.epsilon / 2, o.gamma, o.epsilon ** 0.5))
    plain = estimator.working_model("plain")
    params = [p for p in plain.parameters() if p.requires_grad]
    flat = {k: v.reshape(C * o.batch_size, *v.shape[2:]) for k, v in rows.items()}  # (C·m, ...): the chains' rows as one batch

    def one_forward_backward(batch: dict[str, torch.Tensor]) -> None:
        torch.autograd.grad(estimator.loss(plain, batch), params, allow_unused=True)

    def each_chain() -> None:
        for c in range(C):
            one_forward_backward({k: v[c] for k, v in rows.items()})

    with torch.enable_grad():
        costs = {
            "batched_step": median_ms(lambda: estimator._batched_step(w, rows), reps),
            "sequential_step": median_ms(lambda: estimator._sequential_step(w, rows), reps),
            "chains_one_by_one_plain": median_ms(each_chain, reps),  # C plain forward/backwards, shared weights
            "all_rows_one_plain": median_ms(lambda: one_forward_backward(flat), reps),  # the bound for batching
            "minibatch": median_ms(lambda: estimator.minibatch(rows_rng), reps),
            "noise": median_ms(lambda: estimator.draw_noise(noise_rng, noise), reps),
            "update": median_ms(lambda: estimator.sgld_update(w.clone(), torch.zeros(C, P), noise, 1.0, half_epsilon, gamma,
                                                              root_epsilon), reps),
        }
    return {k: round(v[0], 3) for k, v in costs.items()}, {k: round(v[1], 3) for k, v in costs.items()}


def component_case(probe, model: torch.nn.Module) -> dict[str, float]:
    """Per-head rLLC of every head: batched together vs one head after another (seconds, and the head count)."""
    from phaselens.models.adapter import adapter_for

    heads = [c for c in adapter_for(model).component_parameters() if c.kind == "heads"]
    began, began_cpu = time.perf_counter(), time.process_time()
    together = probe.estimator(model).estimate_components(heads)
    batched, batched_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    began, began_cpu = time.perf_counter(), time.process_time()
    alone = [probe.estimator(model).estimate_components([head])[0] for head in heads]
    sequential, sequential_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    if not all(np.allclose(a.traces, b.traces, rtol=1e-3, atol=1e-4) for a, b in zip(together, alone)):
        raise SystemExit("the heads' chains batched together differ from the same chains run one head at a time")
    print(f"per-head rLLC, {len(heads)} heads × {probe.settings.chains} chains: batched {batched:.2f} s, one head after "
          f"another {sequential:.2f} s ({sequential / batched:.2f}×); λ̂: " + ", ".join(f"{r.component} {r.llc:.1f}" for r in together))
    return {"batched": batched, "sequential": sequential, "cpu_ratio": sequential_cpu / batched_cpu, "heads": len(heads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an induction run (default: train the demo model for 300 steps)")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints measured, spread over the run")
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--option", action="append", default=[], help="other llc options, key=value (repeatable)")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps timed per part in the step profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"chains": args.chains, **dict(item.split("=", 1) for item in args.option)}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.run or short_run(Path(tmp))
        run = pl.open_run(path)
        plan = run.plan(["llc"], {"llc": options}).require()
        ensure_run_files(run, plan)
        probe = plan.probes[0].make()
        probe.bind_run(path)
        steps = run.checkpoint_steps()
        picked = [steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, min(args.checkpoints, len(steps)))]
        warm = make_probe("llc", **{**options, "draws": 2, "burnin": 1})
        warm.bind_run(path)
        model = run.load_model(picked[0])
        for batched in (True, False):  # first calls import and set up torch.func and autograd
            warm.estimator(model).estimate(batched=batched)
        seconds = {True: [], False: []}
        cpu = {True: [], False: []}  # process CPU time: less sensitive to other work on a shared machine
        for step in picked:
            model = run.load_model(step)
            results = {}
            for batched in (True, False):
                began, began_cpu = time.perf_counter(), time.process_time()
                results[batched] = probe.estimator(model).estimate(batched=batched)
                seconds[batched].append(time.perf_counter() - began)
                cpu[batched].append(time.process_time() - began_cpu)
            same = np.allclose(results[True].traces, results[False].traces, rtol=1e-3, atol=1e-4)
            print(f"step {step:>5}: λ̂ = {results[True].llc:8.2f} ± {results[True].llc_std:6.2f}  batched {seconds[True][-1]:6.2f} s  "
                  f"one after another {seconds[False][-1]:6.2f} s  ({seconds[False][-1] / seconds[True][-1]:.2f}×; same chains: {same})")
            if not same:
                raise SystemExit(f"step {step}: the batched chains differ from the sequential ones")
        profile, profile_cpu = step_profile(probe.estimator(run.load_model(picked[-1])), args.profile_steps)
        component_seconds = component_case(probe, run.load_model(picked[-1]))
    s = probe.settings
    outside = profile["minibatch"] + profile["noise"] + profile["update"]
    print(f"one step at step {picked[-1]} (median ms): batched {profile['batched_step']:.2f}, sequential "
          f"{profile['sequential_step']:.2f}; outside the model: minibatch {profile['minibatch']:.3f}, noise "
          f"{profile['noise']:.3f}, update {profile['update']:.3f} ({outside / profile['batched_step']:.1%} of the batched step)")
    ideal = profile["chains_one_by_one_plain"] / profile["all_rows_one_plain"]
    cpu_ideal = profile_cpu["chains_one_by_one_plain"] / profile_cpu["all_rows_one_plain"]
    print(f"bound: {s.chains} one-chain plain forward/backwards {profile['chains_one_by_one_plain']:.2f} ms vs the same "
          f"{s.chains}·{s.batch_size} sequences in one {profile['all_rows_one_plain']:.2f} ms: ideal ratio {ideal:.2f} (CPU time: {cpu_ideal:.2f})")
    print(f"C={s.chains} chains, {s.burnin} burn-in + {s.draws} draws, minibatch {s.batch_size} sequences, n={s.n}, "
          f"{args.threads} torch thread(s)")
    ratio = sum(seconds[False]) / sum(seconds[True])
    print(json.dumps({"benchmark": "llc", "ratio_batched_vs_sequential": round(ratio, 2),
                      "cpu_ratio_batched_vs_sequential": round(sum(cpu[False]) / sum(cpu[True]), 2),
                      "seconds_per_checkpoint": round(float(np.mean(seconds[True])), 2),
                      "seconds_per_checkpoint_sequential": round(float(np.mean(seconds[False])), 2),
                      "ideal_ratio": round(ideal, 2), "cpu_ideal_ratio": round(cpu_ideal, 2),
                      "step_ratio": round(profile["sequential_step"] / profile["batched_step"], 2), "step_ms": profile,
                      "step_cpu_ms": profile_cpu,
                      "ratio_components_batched_vs_sequential": round(component_seconds["sequential"] / component_seconds["batched"], 2),
                      "cpu_ratio_components_batched_vs_sequential": round(component_seconds["cpu_ratio"], 2),
                      "seconds_components_batched": round(component_seconds["batched"], 2),
                      "seconds_components_sequential": round(component_seconds["sequential"], 2),
                      "components": component_seconds["heads"],
                      "chains": s.chains, "batch_size": s.batch_size, "steps": s.burnin + s.draws, "threads": args.threads}))


if __name__ == "__main__":
    main()
