"""Side-by-side timing of trainers in one process, shared by the telemetry benchmarks.

Each mode steps through the same steps in interleaved blocks, so a slow patch of the machine
hits every mode alike, and ratios are taken per block before the median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable


def parse_args(description: str, steps: int) -> argparse.Namespace:
    """--steps, --block, --threads and config overrides for every mode; sets torch's thread count."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="steps per mode")
    parser.add_argument("--block", type=int, default=50, help="steps per interleaved block")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the presets use 1)")
    parser.add_argument("override", nargs="*", help="config overrides for every mode, e.g. telemetry.rows=4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def time_blocks(steppers: dict[str, Callable[[int], object]], finish_block: dict[str, Callable[[], object]],
                steps: int, block: int) -> dict[str, list[float]]:
    """Seconds per block for each mode: `steppers[mode](step)` for the block's steps, then `finish_block[mode]()`."""
    times: dict[str, list[float]] = {mode: [] for mode in steppers}
    for start in range(0, steps, block):
        for mode, step_fn in steppers.items():
            began = time.perf_counter()
            for step in range(start, min(steps, start + block)):
                step_fn(step)
            finish_block[mode]()
            times[mode].append(time.perf_counter() - began)
    return times


def block_ratio(times: dict[str, list[float]], mode: str, base: str = "off") -> float:
    """Median over blocks of the time of `mode` over the time of `base`."""
    return statistics.median(t / b for t, b in zip(times[mode], times[base]))


def ms_per_step(times: dict[str, list[float]], steps: int) -> dict[str, float]:
    return {mode: 1000 * sum(t) / steps for mode, t in times.items()}
