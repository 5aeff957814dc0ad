"""Registration by import: built-in tasks, probes and report sections register when their module loads.

`load_package(package, suffix)` imports every module of a built-in package (so adding one is adding
its file), then every module named by an installed distribution under the entry-point group
`phaselens.plugins` (how a study living in another package plugs in). Imports nothing of phaselens.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from importlib import metadata

ENTRY_POINT_GROUP = "phaselens.plugins"


@functools.cache
def load_package(package: str, suffix: str = "") -> None:
    """Import every module of `package` whose name ends with `suffix` (private ones, `_x`, excluded)."""
    path = importlib.import_module(package).__path__
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.endswith(suffix) and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    load_entry_points()


@functools.cache
def load_entry_points() -> None:
    """Import the modules other packages declare under `phaselens.plugins` (their registrations run)."""
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry.value.split(":")[0])
