"""docs/tutorials/export.md: its commands and code run as written (on the 20-step induction run, with fewer steps)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import phaselens
from phaselens.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "tutorials" / "export.md"
MARKER = "<!-- run by tests/test_export_docs.py -->"


def block(marker: str) -> str:
    """The page's one tested code block that contains `marker`."""
    blocks = re.findall(re.escape(MARKER) + r"\n```(?:bash|python)\n(.*?)```", PAGE.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, (marker, len(blocks))
    return found[0]


def run_commands(text: str, paths: dict[str, Path], extra: dict[str, list[str]] | None = None) -> list[str]:
    """Each `phaselens ...` line of a bash block through the CLI, with the page's paths replaced by `paths`."""
    outputs = []
    for line in text.strip().splitlines():
        for page_path, path in sorted(paths.items(), key=lambda item: -len(item[0])):
            line = line.replace(page_path, str(path))
        args = shlex.split(line)
        assert args[0] == "phaselens", line
        args = args[1:] + (extra or {}).get(args[1], [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (line, result.output)
        outputs.append(result.output)
    return outputs


def test_every_tested_block_of_the_page_is_found():
    assert PAGE.read_text().count(MARKER) == 5


def test_the_tensorboard_export_command(induction_run, tmp_path):
    pytest.importorskip("tensorboard")
    (out,) = run_commands(block("--format tensorboard"), {"runs/demo-tb": tmp_path / "tb", "runs/demo": induction_run})
    assert "scalars" in out and any((tmp_path / "tb" / "live").glob("events.out.tfevents.*"))


def test_the_live_mirror_command(tmp_path):
    pytest.importorskip("tensorboard")
    run_commands(block("telemetry.tensorboard="), {"runs/tb": tmp_path / "tb", "runs/induction": tmp_path / "run"},
                 extra={"train": ["train.steps=6", "train.checkpoint_every=3", "telemetry.every=3"]})
    assert any((tmp_path / "tb" / "induction" / "live").glob("events.out.tfevents.*"))
    assert any((tmp_path / "tb" / "induction" / "checkpoint").glob("events.out.tfevents.*"))


def test_the_hf_series_commands(induction_run, tmp_path):
    run_commands(block("--format hf-series"), {"runs/demo-hf": tmp_path / "hf", "runs/demo-back": tmp_path / "back",
                                               "runs/demo": induction_run})
    from phaselens.run import open_run

    back = open_run(tmp_path / "back")
    assert back.checkpoint_steps() == [0, 10, 20]
    assert set(back.metrics()["probe"]) == {"heads", "loss"}


def test_the_typed_analysis_script_runs_and_type_checks(induction_run, tmp_path):
    code = block("def induction_curve")
    namespace: dict = {}
    exec(code, namespace)
    curve = namespace["induction_curve"](str(induction_run))
    assert list(curve.columns) == ["step", "value"] and len(curve) > 0

    (command,) = block("mypy ").strip().splitlines()
    script = tmp_path / "analysis.py"

    def check(text: str) -> subprocess.CompletedProcess:
        script.write_text(text)
        # phaselens from this checkout's source; its own modules are `make typecheck`'s business, and torch is left
        # out here (--no-site-packages) so the check takes seconds rather than minutes
        args = [sys.executable, "-m", *shlex.split(command), "--no-site-packages", "--follow-imports=silent",
                "--cache-dir", os.devnull]
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MYPYPATH": str(Path(phaselens.__file__).parents[1])})

    pytest.importorskip("mypy")
    ok = check(code)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the names of `import phaselens as pl` carry their types: a wrong use is caught, not read as Any
    wrong = check(code + '\n\nfirst: str = pl.open_run("runs/demo").checkpoint_steps()[0]\n')
    assert wrong.returncode == 1 and 'expression has type "int", variable has type "str"' in wrong.stdout, wrong.stdout


def test_the_type_checking_imports_of_the_package_list_every_lazy_name():
    """Type checkers read `pl.NAME` from the TYPE_CHECKING imports: each lazy name, from the module it loads from."""
    import ast

    tree = ast.parse(Path(phaselens.__file__).read_text())
    (guard,) = [node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"]
    typed = {alias.name: node.module for node in guard.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert typed == phaselens._LAZY


def test_every_public_name_is_fully_annotated():
    """`pl.NAME` functions, and the public methods of `pl.NAME` classes, annotate every parameter and their return."""
    import inspect

    def unannotated(fn, owner: str = "") -> list[str]:
        signature = inspect.signature(fn)
        gaps = [f"{owner}{fn.__name__}({name})" for name, p in signature.parameters.items()
                if name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        if signature.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
            gaps.append(f"{owner}{fn.__name__} -> ?")
        return gaps

    gaps = []
    for name in sorted(phaselens._LAZY):
        value = getattr(phaselens, name)
        if inspect.isclass(value) and not issubclass(value, Exception):
            for attr, member in vars(value).items():
                function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if (not attr.startswith("_") or attr == "__init__") and inspect.isfunction(function):
                    gaps += unannotated(function, f"{name}.")
        elif inspect.isfunction(value):
            gaps += unannotated(value)
    assert not gaps, gaps
