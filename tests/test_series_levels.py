"""The level a series ends (or starts) at is one definition, the median of its last (first) 5%, shared by
every analysis and report."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

import phaselens
from phaselens.signals.levels import final_level, initial_level


def test_the_final_level_is_the_median_of_the_last_five_percent_so_one_spike_does_not_decide():
    values = np.r_[np.full(95, 4.0), [1.0, 1.1, 0.9, 1.0, 9.0]]  # 100 points: the last 5 end on a spike
    assert final_level(values) == 1.0
    assert initial_level(values) == 4.0
    assert final_level(pd.Series(values)) == final_level(values)


def test_short_series_use_their_last_point_and_missing_values_are_skipped():
    assert final_level([3.0, 2.0, 1.0]) == 1.0
    assert final_level(pd.Series([2.0, 1.0, np.nan])) == 1.0
    assert initial_level([np.nan, 5.0, 1.0]) == 5.0
    assert math.isnan(final_level([])) and math.isnan(final_level([np.nan, np.nan]))


def test_no_module_outside_signals_recomputes_the_last_five_percent():
    package = Path(phaselens.__file__).parent
    own = package / "signals" / "levels.py"
    offenders = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py") if path != own
                 for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"//\s*20\b", line)]
    assert offenders == []
