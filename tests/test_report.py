"""`write_report`: figures and report.md of a real (short) induction run, and of one with only loss telemetry."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from phaselens.analysis.induction import summarize_induction
from phaselens.report import write_report
from phaselens.run import open_run
from phaselens.training.config import load_config
from phaselens.training.trainer import train

FIGURES = ("dashboard.png", "entropy_heatmap.png", "head_scores.png")
TRANSITIONS_HEADER = "| probe | metric | layer | head | step | start | end | before | after |"


def _train(tmp_path_factory, *overrides: str):
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config("induction", ["train.steps=150", "train.checkpoint_every=50", *overrides]), out, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory)


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report(run_dir)


@pytest.fixture(scope="module")
def loss_only_run(tmp_path_factory):
    return _train(tmp_path_factory, "telemetry.probes=[loss]")


def test_report_is_written_into_the_run_report_folder(run_dir, report):
    assert report == run_dir / "report" / "report.md"
    assert report.is_file()


@pytest.mark.parametrize("name", FIGURES)
def test_report_figures_are_readable_pngs(report, name):
    path = report.parent / name
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 800 and height >= 300, f"{name} is {width}×{height}, too small to read"
    assert path.stat().st_size > 10_000, f"{name} is nearly empty"


def test_report_says_what_happened_and_lists_transitions(run_dir, report):
    text = report.read_text()
    run = open_run(run_dir)
    assert text.startswith(f"# phaselens report: {run.name}")
    assert "## What happened" in text
    for line in summarize_induction(run).text().splitlines():
        assert line in text
    transitions = run.transitions()
    assert len(transitions), "a 150-step run with live telemetry moves at least some attention series"
    assert TRANSITIONS_HEADER in text
    assert f"{len(transitions)} transitions in all" in text
    assert "| `model.d_vocab` | 64 |" in text
    for name in FIGURES:
        assert f"]({name})" in text  # relative links, so the folder can be moved or zipped


def test_report_of_a_loss_only_run_skips_what_was_not_recorded(loss_only_run):
    report = write_report(loss_only_run)
    text = report.read_text()
    assert (report.parent / "dashboard.png").is_file(), "the loss panel can still be drawn"
    assert not (report.parent / "entropy_heatmap.png").exists()
    assert not (report.parent / "head_scores.png").exists()
    assert "**entropy_heatmap** left out" in text and "**head_scores** left out" in text
    assert "Not drawn" in text and "probe `heads`" in text  # the dashboard says which panels are missing
    assert summarize_induction(open_run(loss_only_run)).text().splitlines()[0] in text


def test_report_does_not_import_torch(run_dir):
    code = (
        "import sys; from phaselens.report import write_report; "
        f"write_report({str(run_dir)!r}); assert 'torch' not in sys.modules, 'the report imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
