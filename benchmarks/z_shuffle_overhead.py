"""Cost of the live late-disambiguation diagnostics on `disamb_small`, measured side by side in one process.

Three trainers of the disamb_small configuration step in interleaved blocks:
  off      training only (the loss is logged, no probes)
  preset   the `loss` probe every 10 steps, as the preset does (first_target, z_shuffled, gap)
  every    the `loss` probe every step
The z-shuffled loss needs one extra no-grad forward of the telemetry rows (32 of the 128) per
measured step. The last line is JSON: ratios of time per step against `off`.

    .venv/bin/python benchmarks/z_shuffle_overhead.py [--steps 400] [--block 50] [--threads 1]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from phaselens.training.config import load_config
from phaselens.training.trainer import Trainer

from interleaved import block_ratio, ms_per_step, parse_args, time_blocks  # beside this script

MODES = {"off": ["telemetry.probes=[]"], "preset": ["telemetry.every=10"], "every": ["telemetry.every=1"]}


def make_trainer(root: Path, mode: str, steps: int, extra: list[str]) -> Trainer:
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={10 * steps}",
                 *MODES[mode], *extra]
    trainer = Trainer(load_config("disamb_small", overrides), root / mode, progress=False)
    trainer.setup()
    return trainer


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], steps=400)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {mode: make_trainer(Path(tmp), mode, args.steps, args.override) for mode in MODES}
        times = time_blocks({mode: trainer.step for mode, trainer in trainers.items()},
                            {mode: trainer.telemetry.flush for mode, trainer in trainers.items()}, args.steps, args.block)
        for trainer in trainers.values():
            trainer.telemetry.close()
    ratios = {mode: block_ratio(times, mode) for mode in ("preset", "every")}
    ms = ms_per_step(times, args.steps)
    print("ms/step  " + "  ".join(f"{mode} {value:.2f}" for mode, value in ms.items()))
    print(f"loss probe with z_shuffled every 10 steps: {100 * (ratios['preset'] - 1):+.1f}% per step; "
          f"every step: {100 * (ratios['every'] - 1):+.1f}%")
    print(json.dumps({"benchmark": "z_shuffle_overhead", "ratio_every_10": round(ratios["preset"], 4),
                      "ratio_every_step": round(ratios["every"], 4), "steps": args.steps, "block": args.block,
                      "ms_per_step": {k: round(v, 3) for k, v in ms.items()}, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
