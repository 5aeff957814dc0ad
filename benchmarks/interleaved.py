"""Side-by-side timing of trainers in one process, shared by the telemetry benchmarks.

Each mode steps through the same steps in interleaved blocks, so a slow patch of the machine
hits every mode alike, and ratios are taken per block before the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


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
