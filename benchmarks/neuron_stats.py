"""Neuron statistics: time over a bare forward pass of the same tokens, and peak memory at 10× the tokens.

    .venv/bin/python benchmarks/neuron_stats.py [--run RUN] [--tokens 40000] [--repeats 3]

The model is the `bdh_shakespeare_small` preset's BDH (random weights, or RUN's last checkpoint)
and the tokens are the held-out Shakespeare text. The scan (every layer's xy_sparse folded into
per-neuron count, sum, max and top-10 with positions) and a bare forward of the same chunks run
in interleaved rounds in one process; the ratio is the median round. Peak memory is measured in
two fresh processes, at N and at 10·N tokens: the growth of peak RSS (peak CUDA memory on a GPU)
over the process's footprint just before the scan.
Last line: {"benchmark": "neuron_stats", "overhead_ratio": ..., "memory_ratio_10x_tokens": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from phaselens.analysis.neurons import bare_forward, chunk_rows, scan_neurons, text_stream


def build_model(run: str | None):
    if run:
        from phaselens.run import open_run

        return open_run(run).load_model()
    from phaselens.models import build_model as build
    from phaselens.training.config import load_config

    torch.manual_seed(0)
    return build(load_config("bdh_shakespeare_small").model)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(run: str | None, tokens: int) -> int:
    """Peak memory of one scan over `tokens` tokens, above the footprint before it (run in a fresh process)."""
    model = build_model(run)
    stream = text_stream(corpus="shakespeare")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_bytes()
    scan_neurons(model, stream, n_tokens=tokens, progress=False)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=None, help="a BDH run to take the last checkpoint from (default: random weights)")
    parser.add_argument("--tokens", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak", type=int, default=0, help=argparse.SUPPRESS)  # child mode: print one peak
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        print(peak_growth(args.run, args.peak))
        return

    model = build_model(args.run)
    stream = text_stream(corpus="shakespeare")
    rows = chunk_rows(model.cfg.n_ctx, model.cfg.n_heads * model.cfg.n_neurons)
    bare_forward(model, stream, 2 * model.cfg.n_ctx * rows, rows)  # warm-up
    ratios = []
    for round_ in range(args.repeats):
        began = time.perf_counter()
        bare_forward(model, stream, args.tokens, rows)
        bare = time.perf_counter() - began
        began = time.perf_counter()
        scan = scan_neurons(model, stream, n_tokens=args.tokens, progress=False, rows=rows)
        scanned = time.perf_counter() - began
        ratios.append(scanned / bare)
        print(f"round {round_}: bare forward {bare:.2f} s, with neuron statistics {scanned:.2f} s "
              f"({scan.tokens:,} tokens, {rows} sequences per chunk): ratio {ratios[-1]:.3f}")

    peaks = {}
    for tokens in (args.tokens, 10 * args.tokens):
        command = [sys.executable, __file__, "--peak", str(tokens), "--threads", str(args.threads)]
        if args.run:
            command += ["--run", args.run]
        peaks[tokens] = int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"peak memory growth over {tokens:,} tokens: {peaks[tokens] / 2**20:.1f} MiB")
    memory_ratio = peaks[10 * args.tokens] / peaks[args.tokens]
    print(json.dumps({"benchmark": "neuron_stats", "overhead_ratio": round(statistics.median(ratios), 3),
                      "memory_ratio_10x_tokens": round(memory_ratio, 3)}))


if __name__ == "__main__":
    main()
