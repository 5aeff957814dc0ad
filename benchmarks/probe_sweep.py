"""Post-hoc probes over a run's checkpoints: phaselens against the naive way, side by side.

  phaselens  `run_probes` with the default probe set: each checkpoint loaded once into a model
             built once per worker, the probe batch run once with only the needed hooks cached,
             every metric computed on the device in one pass over layers and heads
  naive      per checkpoint: build the model, load the weights, an unfiltered `run_with_cache`,
             then the same metrics head by head and layer by layer in Python, each value
             pulled to the CPU and written on its own
  floor      per checkpoint: its weights loaded into a model built once, one forward of the probe
             batch caching only the hooks the probes read, and (when `patching` is measured) one
             forward of the corrupted batch: the forwards no post-hoc tool can skip
and phaselens with 1 and 2 local worker processes. The naive way also runs with two torch threads
(what a script left at torch's defaults uses on a 2-core machine), to set against 2 workers.
The last line is JSON (`ratio_vs_floor`: phaselens with 1 worker over the floor; 1 is the limit).

    .venv/bin/python benchmarks/probe_sweep.py [--run runs/demo] [--set model.n_heads=8 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import phaselens as pl
from phaselens.models import build_model
from phaselens.posthoc.runner import run_probes
from phaselens.probes.attention import attention_coherence, attention_entropy, attention_head_variance, attention_specialization
from phaselens.probes.attention_to import attention_mass
from phaselens.probes.heads import detection_patterns, head_score
from phaselens.probes.logit_lens import logit_lens_stats
from phaselens.probes.loss import masked_mean, token_losses
from phaselens.models.sites import residual_sites
from phaselens.probes.patching import corrupt_positions, target_probability
from phaselens.store.metrics import MetricsStore
from phaselens.models.checkpoints import load_weights
from phaselens.training.config import load_config
from phaselens.training.trainer import train


def site_hooks(n_layers: int) -> list[str]:
    """The hook of each residual stream 0..n_layers."""
    return [site.hook for site in residual_sites(n_layers)]


def fresh_copy(run: Path, root: Path, name: str) -> Path:
    """A copy of the run without checkpoint-source rows, so every checkpoint is measured."""
    path = root / name
    shutil.copytree(run, path, ignore=shutil.ignore_patterns("report", "artifacts"))
    store = MetricsStore(path / "metrics.sqlite")
    store.delete_from_step(0, source="checkpoint")
    store.close()
    return path


def naive_sweep(path: Path) -> int:
    """What a researcher writes by hand for the same metrics."""
    run = pl.open_run(path)
    batch = run.probe_batch()
    store = MetricsStore(path / "metrics.sqlite")
    n_rows = 0
    for step in run.checkpoint_steps():
        model = build_model(run.run_config().model)
        load_weights(model, run.dir.checkpoint(step))
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch.tokens)
            rows = []
            L, H = model.cfg.n_layers, model.cfg.n_heads
            detection = detection_patterns(batch.tokens)
            for layer in range(L):
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
                for head in range(H):
                    single = pattern[:, head : head + 1]
                    rows.append((step, "attention", "entropy", layer, head, attention_entropy(single).item()))
                    rows.append((step, "attention", "coherence", layer, head, attention_coherence(single).item()))
                    rows.append((step, "attention", "specialization", layer, head, attention_specialization(pattern)[1][head].item()))
                    for name, d in detection.items():
                        rows.append((step, "heads", name, layer, head, head_score(single, d).item()))
                    queries = torch.cat([batch.positions["copy"], torch.zeros_like(batch.positions["copy"][:, :1])], 1)
                    rows.append((step, "attention_to", "mass", layer, head, attention_mass(single, queries, batch.positions["source"]).item()))
                rows.append((step, "attention", "specialization", layer, None, attention_specialization(pattern)[0].item()))
                rows.append((step, "attention", "head_variance", layer, None, attention_head_variance(pattern).item()))
            losses = token_losses(logits, batch.tokens)
            rows.append((step, "loss", "all", None, None, masked_mean(losses, batch.loss_mask).item()))
            rows.append((step, "loss", "copy", None, None, masked_mean(losses, batch.positions["copy"]).item()))
            rows.append((step, "loss", "non_copy", None, None, masked_mean(losses, ~batch.positions["copy"]).item()))
            names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(L)]
            for layer, name in enumerate(names):
                stats = logit_lens_stats(cache[name][None], model, batch.tokens, batch.loss_mask)
                rows += [(step, "logit_lens", metric, layer, None, value.item()) for metric, value in stats.items()]
            corrupted = corrupt_positions(batch.tokens, batch.positions["source"], model.cfg.d_vocab, 0)
            weights = batch.positions["copy"].float()
            baseline = (target_probability(model(corrupted), batch.tokens) * weights).sum(-1) / weights.sum(-1)
            effects = []
            for layer, name in enumerate(site_hooks(L)):  # one patched forward per layer
                def patch(activation, hook, clean=cache[name]):
                    return torch.where(batch.positions["source"][..., None], clean, activation)
                patched = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
                effect = (target_probability(patched, batch.tokens) * weights).sum(-1) / weights.sum(-1) - baseline
                effects.append(effect)
                rows.append((step, "patching", "effect", layer, None, effect.mean().item()))
            rows.append((step, "patching", "z_dependence", None, None, torch.stack(effects).max(0).values.mean().item()))
        for row in rows:  # one insert per value
            store.write([(*row, "checkpoint")])
        n_rows += len(rows)
    store.close()
    return n_rows


def floor_sweep(path: Path, probe_names: list[str]) -> None:
    """Load each checkpoint into one built model and run only the forwards the probes need."""
    import phaselens.probes  # noqa: F401
    from phaselens.models.adapter import adapter_for
    from phaselens.probes.base import make_probe

    run = pl.open_run(path)
    batch = run.probe_batch()
    model = build_model(run.run_config().model)
    model.eval()
    hooks = sorted({name for probe in probe_names for name in make_probe(probe).hook_names(adapter_for(model))})
    corrupted = corrupt_positions(batch.tokens, batch.positions["source"], model.cfg.d_vocab, 0) if "patching" in probe_names else None
    for step in run.checkpoint_steps():
        load_weights(model, run.dir.checkpoint(step))
        with torch.no_grad():
            model.run_with_cache(batch.tokens, names_filter=hooks)
            if corrupted is not None:
                model(corrupted)


def timed(fn) -> tuple[float, object]:
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run directory (default: train a 1,000-step induction run)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the induction preset for the run trained without --run (e.g. model.n_heads=8)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = args.run
        if run is None:
            run = root / "source"
            train(load_config("induction", ["train.steps=1000", "train.checkpoint_every=50", *args.set]), run, progress=False)
        probes = pl.open_run(run).plan().names  # the run's task's default set
        if set(probes) != {"attention", "heads", "loss", "logit_lens", "attention_to", "patching"}:
            raise SystemExit(f"the naive loop computes the induction task's six default probes; this run's are {probes}")
        n_ckpt = len(pl.open_run(run).checkpoint_steps())
        # Interleaved rounds, each on fresh copies; the median of each side is reported (this
        # machine's timings wander by 10% from one run to the next).
        # `naive_2_threads`: the naive way with two torch threads, as a script left at torch's
        # defaults runs on a 2-core machine; the fair opponent of phaselens with 2 workers.
        times: dict[str, list[float]] = {"naive": [], "naive_2_threads": [], "floor": [], "one": [], "two": []}
        for round_ in range(args.rounds):  # the copies are made before the clock starts: neither side's work
            copies = {side: fresh_copy(run, root, f"{side}{round_}") for side in times if side != "floor"}
            t, naive_rows = timed(lambda: naive_sweep(copies["naive"]))
            times["naive"].append(t)
            torch.set_num_threads(2)
            t, _ = timed(lambda: naive_sweep(copies["naive_2_threads"]))
            times["naive_2_threads"].append(t)
            torch.set_num_threads(1)
            t, _ = timed(lambda: floor_sweep(run, probes))
            times["floor"].append(t)
            t, one = timed(lambda: run_probes(copies["one"], probes, workers=1, progress=False))
            times["one"].append(t)
            t, two = timed(lambda: run_probes(copies["two"], probes, workers=2, progress=False))
            times["two"].append(t)
        rounds = {k: [round(x, 2) for x in v] for k, v in times.items()}
        t_naive, t_naive2, t_floor, t_one, t_two = (statistics.median(times[k]) for k in ("naive", "naive_2_threads", "floor", "one", "two"))
    assert one.ok and two.ok, (one.failures, two.failures)
    print(f"{n_ckpt} checkpoints, probes {','.join(probes)}")
    print(f"medians of {args.rounds} rounds: naive {t_naive:.2f} s ({naive_rows} rows), with 2 threads {t_naive2:.2f} s  "
          f"floor {t_floor:.2f} s  phaselens 1 worker {t_one:.2f} s ({one.rows} rows), 2 workers {t_two:.2f} s")
    print(json.dumps({"benchmark": "probe_sweep", "ratio_vs_naive": round(t_naive / t_one, 3), "ratio_vs_floor": round(t_one / t_floor, 3), "ratio_vs_naive_2_workers": round(t_naive / t_two, 3),
                      "ratio_2_workers_vs_naive_2_threads": round(t_naive2 / t_two, 3),
                      "speedup_2_workers": round(t_one / t_two, 3), "checkpoints": n_ckpt,
                      "rows": {"naive": naive_rows, "phaselens": one.rows},
                      "seconds": {"naive": round(t_naive, 2), "naive_2_threads": round(t_naive2, 2), "floor": round(t_floor, 2), "workers_1": round(t_one, 2), "workers_2": round(t_two, 2)},
                      "rounds": rounds}))


if __name__ == "__main__":
    main()
