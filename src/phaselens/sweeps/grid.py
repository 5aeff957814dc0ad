"""A sweep grid from `key=v1,v2` arguments: the cross product of every key's values.

Keys that must change together form one linked axis: `data.k,data.n_unique_b=2:500,10:100` gives
the two points (k=2, n_unique_b=500) and (k=10, n_unique_b=100), e.g. a K grid at fixed n_unique_b·K.
"""

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
        seen = {part for k, _ in axes for part in k.split(",")}
        for part in key.split(","):
            if part in seen:
                raise ConfigError(f"sweep axis {part} is given twice; list all its values once: {part}=v1,v2")
        if "," in key:
            width = len(key.split(","))
            bad = [c for c in choices if len(c.split(":")) != width]
            if bad:
                raise ConfigError(f"linked sweep axis {key} needs {width} values per point joined by ':' "
                                  f"(e.g. {key}={':'.join(['v'] * width)}), got {bad[0]!r}")
        if len(set(choices)) != len(choices):
            raise ConfigError(f"sweep axis {key} repeats a value: {values}")
        axes.append((key, choices))
    return axes


def axis_keys(axes: list[tuple[str, list[str]]]) -> list[str]:
    """Every config key the axes set (linked axes contribute each of their keys)."""
    return [part for key, _ in axes for part in key.split(",")]


def grid_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, in order (the last axis varies fastest)."""
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        point: dict[str, str] = {}
        for (key, _), value in zip(axes, combo):
            point.update(zip(key.split(","), value.split(":")) if "," in key else [(key, value)])
        points.append(point)
    return points


def point_name(point: dict[str, str]) -> str:
    """A directory name for a grid point: `lr=0.001_batch_size=64` (the last part of each key)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts)) or "run"
