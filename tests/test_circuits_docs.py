"""docs/tutorials/circuits.md runs as written, on the 20-step induction run with fewer sequences: the sweep, the
report with its circuits section and figures, the export with the over-training rows, the remeasure with other
options, and the Python block."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from phaselens.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "circuits.md"
MARK = "<!-- run by tests/test_circuits_docs.py -->"
FEWER = ["--probe-option", "circuits.rows=4"]  # fewer sequences: the same code paths


def blocks() -> list[str]:
    return [code for _, code in re.findall(re.escape(MARK) + r"\n```(python|bash)\n(.*?)```", DOCS.read_text(), flags=re.S)]


def run_cli(line: str, extra: list[str] = ()) -> str:
    """One `phaselens ...` line of the page, in this process."""
    result = CliRunner().invoke(app, [*shlex.split(line)[1:], *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_block_of_the_page_is_run_here():
    assert len(blocks()) == 3 == len(re.findall(r"^```(?:python|bash)$", DOCS.read_text(), flags=re.M))


@pytest.fixture
def one_thread():
    """One torch thread: the tiny model's patched forwards are far slower when two threads contend on shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_circuits_tutorial_runs_as_written(induction_run, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(induction_run, tmp_path / "runs" / "demo")
    commands, remeasure, python = blocks()
    probe_line, report_line, export_line = commands.strip().splitlines()
    run_cli(probe_line, FEWER)
    run_cli(report_line)
    report = (tmp_path / "runs" / "demo" / "report" / "report.md").read_text()
    section = report.split("## Circuits over training", 1)[1]
    for figure in ("circuit_graphs.png", "circuit_edges.png", "circuit_stability.png"):
        assert f"]({figure})" in section and (tmp_path / "runs" / "demo" / "report" / figure).stat().st_size > 5000
    assert "EAP-IG vs exact" in section  # the 29-edge graph runs every method
    run_cli(export_line)
    exported = pd.read_csv(tmp_path / "runs" / "demo" / "metrics.csv")
    circuits = set(exported.loc[exported["probe"] == "circuits", "metric"])
    assert {"edge:L0H1->L1H0.k", "jaccard_final", "weighted_jaccard_prev_lo", "spearman_eap_ig"} <= circuits

    run_cli(remeasure.strip(), FEWER)
    namespace: dict = {}
    exec(python, namespace)
    assert set(namespace["edges"]["method"]) == {"eap_ig"}  # remeasured with EAP-IG alone
    assert len(namespace["k_inputs"]) == 3 * 8  # 8 edges into a k input of the 29, at each of the 3 checkpoints
    assert list(namespace["stability"]["step"]) == [0, 10, 20]
