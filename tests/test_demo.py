"""The main job, end to end: `phaselens demo` finds the induction transition, and the 1-layer control does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

import phaselens as pl
from phaselens.analysis.induction import summarize_induction

pytestmark = pytest.mark.slow


def run_demo(out, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "phaselens.cli", "demo", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_demo_prints_where_its_report_is_and_a_verdict_that_matches_its_numbers(demo_run):
    """Holds for any seed and thread count (`make test-perturbed`): the copy loss starts at chance, and what the demo
    prints and writes is the summary of its own metrics, whichever verdict that is."""
    path, output = demo_run
    assert f"report: {path / 'report' / 'report.md'}" in output
    summary = summarize_induction(pl.open_run(path))
    assert summary.copy_loss_initial == pytest.approx(4.16, abs=0.1)  # chance: ln 64
    report = (path / "report" / "report.md").read_text()
    for line in summary.text().splitlines():
        assert line in output and line in report
    verdict = summary.text().splitlines()[0]
    assert verdict.startswith("Induction transition at step") == summary.found
    assert f"{summary.copy_loss_final:.2f}" in verdict
    if summary.found:  # an induction head reads the previous-token head's output: it cannot sit in layer 0
        assert summary.induction_head.layer == 1 and summary.induction_head.after > 0.5
        assert summary.prev_token_head.layer == 0 and summary.prev_token_head.after > 0.25
    for figure in ("dashboard.png", "entropy_heatmap.png", "head_scores.png"):
        assert (path / "report" / figure).stat().st_size > 10_000


def test_demo_reports_the_induction_transition_of_the_two_layer_model(reference_demo_run):
    """The reference run (seed 0): induction heads form, and the copy loss ends far below chance."""
    path, output = reference_demo_run
    assert "Induction transition at step" in output
    summary = summarize_induction(pl.open_run(path))
    assert summary.found
    assert summary.copy_loss_final < 1.0
    assert summary.induction_head.layer == 1 and summary.induction_head.after > 0.5
    assert summary.prev_token_head.layer == 0 and summary.prev_token_head.after > 0.25
    assert "Induction transition" in (path / "report" / "report.md").read_text()


def test_one_layer_control_reports_no_induction_transition(tmp_path):
    """1,600 steps: well past the two-layer model's first copy-loss drop (~1,100), half the demo's cost."""
    output = run_demo(tmp_path / "control", "--layers", "1", "--steps", "1600")
    assert "No induction transition" in output
    summary = summarize_induction(pl.open_run(tmp_path / "control"))
    assert not summary.found
    assert summary.copy_loss_final > 2.0
