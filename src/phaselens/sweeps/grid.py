"""A sweep grid from `key=v1,v2` arguments: the cross product of every key's values."""

from __future__ import annotations

import itertools
import re

from phaselens.errors import ConfigError


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`["train.lr=1e-3,3e-3", "data.k=10"]` -> [("train.lr", ["1e-3", "3e-3"]), ("data.k", ["10"])]."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"sweep axis {item!r} must look like key=v1,v2 (e.g. train.lr=1e-3,3e-3)")
        key, values = item.split("=", 1)
        key = key.strip()
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not key or not choices:
            raise ConfigError(f"sweep axis {item!r} needs a key and at least one value")
        if key in (k for k, _ in axes):
            raise ConfigError(f"sweep axis {key} is given twice; list all its values once: {key}=v1,v2")
        if len(set(choices)) != len(choices):
            raise ConfigError(f"sweep axis {key} repeats a value: {values}")
        axes.append((key, choices))
    return axes


def grid_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, in order (the last axis varies fastest)."""
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in axes))]


def point_name(point: dict[str, str]) -> str:
    """A directory name for a grid point: `lr=0.001_batch_size=64` (the last part of each key)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts)) or "run"
