"""The `llc` probe's SGLD chains: all C chains batched in one vmapped forward/backward per step,
against the same chains run one after another (as a per-chain sampler does), in one process.

Both ways run the same chains (same minibatches, same noise: each chain has its own seeded
generators), so they give the same λ̂; the script checks that. It measures λ̂ on a few of the
demo model's checkpoints with C = 8 chains and the probe's other default settings, on one torch
thread (what a post-hoc worker uses). Wall-clock and process CPU time are both reported: on a
shared machine the CPU-time ratio is the steadier one. The last line is JSON.

    .venv/bin/python benchmarks/llc.py [--run runs/demo] [--checkpoints 3] [--chains 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import phaselens as pl
from phaselens.posthoc.runner import ensure_training_sample
from phaselens.probes.base import make_probe
from phaselens.store.run_dir import RunDir


def short_run(folder: Path) -> Path:
    """The demo model trained 300 steps (checkpoints 0, 100, 200, 300): same shapes, quick to make."""
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    path = folder / "demo"
    train(load_config("induction", ["train.steps=300", "train.checkpoint_every=100", "telemetry.every=50", "name=demo"]), path,
          progress=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an induction run (default: train the demo model for 300 steps)")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints measured, spread over the run")
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--option", action="append", default=[], help="other llc options, key=value (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"chains": args.chains, **dict(item.split("=", 1) for item in args.option)}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.run or short_run(Path(tmp))
        run = pl.open_run(path)
        ensure_training_sample(RunDir(path), options)
        probe = make_probe("llc", **options)
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
    s = probe.settings
    print(f"C={s.chains} chains, {s.burnin} burn-in + {s.draws} draws, minibatch {s.batch_size} sequences, n={s.n}, "
          f"{args.threads} torch thread(s)")
    ratio = sum(seconds[False]) / sum(seconds[True])
    print(json.dumps({"benchmark": "llc", "ratio_batched_vs_sequential": round(ratio, 2),
                      "cpu_ratio_batched_vs_sequential": round(sum(cpu[False]) / sum(cpu[True]), 2),
                      "seconds_per_checkpoint": round(float(np.mean(seconds[True])), 2),
                      "seconds_per_checkpoint_sequential": round(float(np.mean(seconds[False])), 2),
                      "chains": s.chains, "batch_size": s.batch_size, "steps": s.burnin + s.draws, "threads": args.threads}))


if __name__ == "__main__":
    main()
