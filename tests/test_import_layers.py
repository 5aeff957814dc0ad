"""Imports point down the pipeline only: store → models → tasks → probes → training → run/series →
posthoc/analysis → report/sweeps/server → cli, function-level imports included.

Where the small top-level modules sit:
- `errors`, `progress`, `background`, `plugins`, `registry` are below everything (plain Python:
  exceptions, a progress bar, an ordered worker thread, importing a package's modules by name, a
  name → definition table that refuses duplicates), so any layer may raise, report progress, hand
  work to a thread, load its registrations or keep a registry; `presets` holds YAML files only.
- `signals` (the change-point detector and a series' end levels: pure functions of numpy/pandas
  series) sits just below the run layer, so `Run.transitions()` and everything above share it.
- `run` (`pl.open_run`) sits with `series` in the run layer, below all of `analysis`; so does
  `run_files`, the writers of the files a measurement plan needs (they read a run and its task).
- the package `__init__` (lazy `pl.*` names) is the public facade and sits with `cli` on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import phaselens

PACKAGE = Path(phaselens.__file__).parent
LAYERS = [
    ("errors", "progress", "background", "presets", "plugins", "registry"),
    ("store",),
    ("models",),
    ("tasks",),
    ("probes",),
    ("training",),
    ("signals",),
    ("run", "series", "run_files"),
    ("posthoc", "analysis"),
    ("report", "sweeps", "server", "export"),
    ("cli", "__init__", "__main__"),
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


def _is_module(dotted: str) -> bool:
    """Whether `dotted` (below `phaselens`) names a module or package of PACKAGE."""
    base = PACKAGE.joinpath(*dotted.split(".")) if dotted else PACKAGE
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` of a chain of attributes on a name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return head and f"{head}.{node.attr}"
    return None


def private_imports() -> list[str]:
    """Every private name (`_x`) one module takes from another phaselens module, at any depth of the syntax
    tree: `from phaselens.x import _name`, or `module._name` on a phaselens module it imported."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path) or "__init__"
        own = module_name(path).split(".") if module_name(path) else []
        package = own if path.name == "__init__.py" else own[:-1]
        tree = ast.parse(path.read_text(), str(path))
        modules: dict[str, str] = {}  # local name -> the phaselens module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("phaselens."):
                        local = alias.asname or alias.name
                        modules[local] = alias.name[len("phaselens."):] if alias.asname else "."
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "phaselens" or (node.module or "").startswith("phaselens."):
                source = node.module[len("phaselens."):]
            else:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    problems.append(f"phaselens.{me} (line {node.lineno}) imports {alias.name} from phaselens.{source}")
                elif _is_module(f"{source}.{alias.name}".strip(".")):
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}".strip(".")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = _dotted(node.value)
            if owner in modules and modules[owner] != ".":
                target = modules[owner]
            elif owner and owner.startswith("phaselens.") and any(k.startswith("phaselens") for k in modules):
                target = owner[len("phaselens."):]
            else:
                continue
            if target != module_name(path):
                problems.append(f"phaselens.{me} (line {node.lineno}) reads {node.attr} of phaselens.{target}")
    return problems


def test_no_module_imports_a_private_name_of_another():
    """Private stays private: what several modules share is public in its own module (e.g. `report.plotting`)."""
    assert private_imports() == []


def test_the_private_import_check_sees_them(tmp_path, monkeypatch):
    fake = tmp_path / "phaselens"
    (fake / "report").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "report" / "__init__.py").write_text("")
    (fake / "report" / "figures.py").write_text("def _series():\n    pass\n")
    (fake / "report" / "geometry.py").write_text("def f():\n    from .figures import _series\n    return _series\n")
    (fake / "report" / "grokking.py").write_text("from phaselens.report import figures\n\nfigures._series()\n")
    (fake / "report" / "fine.py").write_text("from phaselens.report import figures\n\nfigures.plot()\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert private_imports() == ["phaselens.report.geometry (line 2) imports _series from phaselens.report.figures",
                                 "phaselens.report.grokking (line 3) reads _series of phaselens.report.figures"]
