"""The command line on bad input and faults, as a new user meets them: every case ends in a clear
message naming the problem, never a Python traceback, and phaselens never deletes a file it did
not write. Each test is one case that once failed; the corpus only grows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phaselens.cli import app

TINY = ["train.steps=5", "train.checkpoint_every=5", "telemetry.every=5"]


def run_cli(*args: str):
    """Invoke `phaselens ARGS` in-process; an exception escaping the command is what prints a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"phaselens {' '.join(map(str, args))} raised {escaped!r}\n{result.output}"
    assert "Traceback" not in result.stderr
    return result


def refused(*args: str, says: str):
    """`phaselens ARGS` exits non-zero with an error line containing `says`."""
    result = run_cli(*args)
    assert result.exit_code != 0, result.output
    assert says in result.stderr, result.stderr
    return result


# ---------------------------------------------------------------------------- data loss


def test_sweep_never_empties_a_point_directory_holding_the_users_files(tmp_path):
    notes = tmp_path / "d" / "run" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("x")
    result = run_cli("sweep", "induction", *TINY, "--out", tmp_path / "d")
    assert notes.read_text() == "x"
    assert result.exit_code == 1 and "notes.txt" in result.output and "failed" in result.output


def test_demo_refuses_to_replace_a_directory_that_is_not_entirely_a_phaselens_run(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "notes.txt").write_text("x")
    refused("demo", "--out", out, "--steps", "20", says="phaselens deletes only directories it wrote")
    assert (out / "notes.txt").read_text() == "x" and (out / "run.json").read_text() == "{}"


def test_demo_refuses_a_real_run_with_a_foreign_file_in_it(run_copy):
    (run_copy / "notes.txt").write_text("x")
    refused("demo", "--out", run_copy, "--steps", "20", says="notes.txt")
    assert (run_copy / "notes.txt").read_text() == "x" and (run_copy / "run.json").is_file()


def test_train_refuses_a_non_empty_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    refused("train", "induction", *TINY, "--out", tmp_path, says="not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
