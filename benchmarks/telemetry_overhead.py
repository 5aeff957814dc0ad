"""Cost of live telemetry on the demo model, measured side by side in one process.

Four trainers of the demo configuration step in interleaved blocks:
  off     training only (the loss is logged, no probes)
  live    phaselens live telemetry every step (attention, heads, loss probes), as `phaselens
          train` runs it: on a spare core while the backward pass runs, when there is one
  inline  the same, measured in the training thread (telemetry.background=false)
  naive   training, then an extra unfiltered `run_with_cache` forward on the same batch per
          step, the same metrics computed from that cache, and rows written at once
The last line is JSON: ratio = live/off, inline_ratio = inline/off, naive_ratio = naive/off
(time per step).

    .venv/bin/python benchmarks/telemetry_overhead.py [--steps 600] [--block 50] [--threads 1]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from phaselens.probes.measure import measure_cache
from phaselens.store.metrics import MetricsStore
from phaselens.training.config import load_config
from phaselens.training.trainer import Trainer

from interleaved import block_ratio, ms_per_step, parse_args, time_blocks  # beside this script

PROBES = ["attention", "heads", "loss"]


def make_trainer(root: Path, mode: str, steps: int, extra: list[str]) -> Trainer:
    probes = PROBES if mode in ("live", "inline") else []
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={10 * steps}",
                 f"telemetry.probes={','.join(probes) or '[]'}", f"telemetry.background={mode != 'inline'}", *extra]
    trainer = Trainer(load_config("induction", overrides), root / mode, progress=False)
    trainer.setup()
    return trainer


class RecordedTask:
    """A task that keeps the batches it draws (newest last), so the naive loop measures the batch it trained on."""

    def __init__(self, task):
        self.task, self.drawn = task, []

    def sample(self, *args, **kwargs):
        self.drawn.append(self.task.sample(*args, **kwargs))
        return self.drawn[-1]

    def __getattr__(self, name):
        return getattr(self.task, name)


def record_batches(trainer: Trainer) -> list:
    """The training batches `trainer` draws from now on, newest last."""
    trainer.task = RecordedTask(trainer.task)
    return trainer.task.drawn


def naive_step(trainer: Trainer, store: MetricsStore, step: int, drawn: list) -> None:
    """What a researcher writes by hand: a second forward with everything cached, metrics, a write."""
    trainer.step(step)
    batch = drawn.pop().to(trainer.device)  # the batch of this update
    with torch.no_grad():
        logits, cache = trainer.model.run_with_cache(batch.tokens)
    frame = measure_cache(cache, batch, PROBES, model=trainer.model, logits=logits, step=step, source="live")
    rows = frame.astype(object).where(frame.notna(), None).itertuples(index=False, name=None)
    store.write([(int(s), p, m, l, h, float(v), src) for s, p, m, l, h, v, src in rows])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], steps=600)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trainers = {mode: make_trainer(root, mode, args.steps, args.override) for mode in ("off", "live", "inline", "naive")}
        naive_store = MetricsStore(root / "naive.sqlite")
        steppers = {mode: trainer.step for mode, trainer in trainers.items()}
        drawn = record_batches(trainers["naive"])
        steppers["naive"] = lambda step: naive_step(trainers["naive"], naive_store, step, drawn)
        times = time_blocks(steppers, {mode: trainer.telemetry.flush for mode, trainer in trainers.items()}, args.steps, args.block)
        rows = trainers["live"].config.telemetry.rows
        background = trainers["live"].telemetry.in_background
        for trainer in trainers.values():
            trainer.telemetry.close()
        naive_store.close()
    ratio, inline_ratio, naive_ratio = (block_ratio(times, mode) for mode in ("live", "inline", "naive"))
    ms = ms_per_step(times, args.steps)
    print(f"ms/step  off {ms['off']:.2f}  live {ms['live']:.2f}  inline {ms['inline']:.2f}  naive {ms['naive']:.2f}")
    print(f"live telemetry costs {100 * (ratio - 1):+.1f}% per step ({100 * (inline_ratio - 1):+.1f}% measured in the training thread);"
          f" the naive way {100 * (naive_ratio - 1):+.1f}%")
    print(json.dumps({"benchmark": "telemetry_overhead", "ratio": round(ratio, 4), "inline_ratio": round(inline_ratio, 4),
                      "naive_ratio": round(naive_ratio, 4), "background": background,
                      "steps": args.steps, "block": args.block, "rows": rows, "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
