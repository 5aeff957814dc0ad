"""Imports point down the pipeline only: store → models → tasks → probes → training → run/series →
posthoc/analysis → report/sweeps/server → cli, function-level imports included.

Where the small top-level modules sit:
- `errors`, `progress`, `background`, `plugins` are below everything (plain Python: exceptions, a
  progress bar, an ordered worker thread, importing a package's modules by name), so any layer may
  raise, report progress, hand work to a thread or load its registrations;
  `presets` holds YAML files only.
- `run` (`pl.open_run`) sits with `series` in the run layer.
- `analysis.transitions`, the change-point detector, is a pure function of a metrics table that
  imports nothing of phaselens; `Run.transitions()` is public API, so it sits in the run layer.
- the package `__init__` (lazy `pl.*` names) is the public facade and sits with `cli` on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import phaselens

PACKAGE = Path(phaselens.__file__).parent
LAYERS = [
    ("errors", "progress", "background", "presets", "plugins"),
    ("store",),
    ("models",),
    ("tasks",),
    ("probes",),
    ("training",),
    ("run", "series", "analysis.transitions"),
    ("posthoc", "analysis"),
    ("report", "sweeps", "server"),
    ("cli", "__init__"),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def layer_of(module: str) -> int:
    """The layer of a dotted module name below `phaselens` ("" is the package itself)."""
    parts = module.split(".") if module else ["__init__"]
    for depth in (2, 1):
        unit = ".".join(parts[:depth])
        if unit in RANK:
            return RANK[unit]
    raise AssertionError(f"phaselens.{module} belongs to no layer: add it to LAYERS in {__file__}")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module below `phaselens`) of every import in the file, at any depth of the syntax tree."""
    own = module_name(path).split(".") if module_name(path) else []
    package = own if path.name == "__init__.py" else own[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - node.level + 1]
                names = ["phaselens." + ".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, name[len("phaselens."):].strip(".")) for name in names if name.startswith("phaselens.")]
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for line, target in imported_modules(path):
            if layer_of(target) > layer_of(me):
                problems.append(f"phaselens.{me or '__init__'} (line {line}) imports phaselens.{target}, a layer above it")
    return problems


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports() == []


def test_the_layer_check_sees_function_level_imports(tmp_path, monkeypatch):
    """A probe importing the trainer inside a function is caught (the check cannot pass vacuously)."""
    fake = tmp_path / "phaselens"
    (fake / "probes").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "probes" / "__init__.py").write_text("")
    (fake / "probes" / "sneaky.py").write_text("def f():\n    from phaselens.training.trainer import train\n    return train\n")
    (fake / "probes" / "fine.py").write_text("from ..tasks.batch import TaskBatch\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert upward_imports() == ["phaselens.probes.sneaky (line 2) imports phaselens.training.trainer, a layer above it"]


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))
