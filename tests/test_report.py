"""`write_report`: figures and report.md of a real (short) induction run, of one with only loss telemetry,
and of one whose checkpoints were swept with the post-hoc probes (`phaselens probe`)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from PIL import Image

from phaselens.analysis.induction import summarize_induction
from phaselens.posthoc.runner import run_probes
from phaselens.report import write_report
from phaselens.run import open_run
from phaselens.store.metrics import MetricsStore
from phaselens.training.config import load_config
from phaselens.training.trainer import train

FIGURES = ("dashboard.png", "entropy_heatmap.png", "head_scores.png")
POST_HOC_FIGURES = ("logit_lens.png", "patching.png")
PROBE_HINT = "run `phaselens probe RUN` to add logit-lens and patching figures"
TRANSITIONS_HEADER = "| probe | metric | layer | head | step | start | end | before | after | effect | source |"


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


@pytest.fixture(scope="module")
def probed_run(run_dir, report, tmp_path_factory):
    """A copy of `run_dir` (with its earlier report) after `phaselens probe` measured the post-hoc probes."""
    copy = tmp_path_factory.mktemp("probed") / "run"
    shutil.copytree(run_dir, copy)
    result = run_probes(copy, probes=["logit_lens", "attention_to", "patching"], progress=False)
    assert result.ok, result.failures
    return copy


@pytest.fixture(scope="module")
def probed_report(probed_run):
    return write_report(probed_run)


def assert_readable_png(path):
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 800 and height >= 300, f"{path.name} is {width}×{height}, too small to read"
    assert path.stat().st_size > 10_000, f"{path.name} is nearly empty"


def test_report_is_written_into_the_run_report_folder(run_dir, report):
    assert report == run_dir / "report" / "report.md"
    assert report.is_file()


@pytest.mark.parametrize("name", FIGURES)
def test_report_figures_are_readable_pngs(report, name):
    assert_readable_png(report.parent / name)


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


def test_report_without_post_hoc_results_says_how_to_add_them(run_dir, report):
    text = report.read_text()
    assert PROBE_HINT in text
    assert f"`phaselens probe {run_dir}`" in text
    for name in POST_HOC_FIGURES:
        assert not (report.parent / name).exists()
        assert f"]({name})" not in text


@pytest.mark.parametrize("name", POST_HOC_FIGURES)
def test_report_draws_post_hoc_figures_once_the_checkpoints_are_probed(probed_report, name):
    assert_readable_png(probed_report.parent / name)
    assert f"]({name})" in probed_report.read_text()


def test_report_of_a_probed_run_captions_the_post_hoc_figures_and_drops_the_hint(probed_report):
    text = probed_report.read_text()
    assert PROBE_HINT not in text  # the copy carried the earlier report's text: it must be rewritten
    assert "Post-hoc probes `attention_to`, `logit_lens`, `patching` measured on 4 checkpoints." in text
    figures = text.split("## Figures", 1)[1]
    lens_caption = figures.split("](logit_lens.png)", 1)[1].split("![", 1)[0]
    patching_caption = figures.split("](patching.png)", 1)[1].split("![", 1)[0]
    assert "Logit lens at every checkpoint" in lens_caption and "0 = embeddings" in lens_caption
    assert "Activation patching at every checkpoint" in patching_caption and "z_dependence" in patching_caption
    assert "left out" not in figures and "Not drawn" not in figures  # every panel had its rows


def test_report_transitions_table_lists_post_hoc_series(probed_run, tmp_path):
    # 20 checkpoints whose z_dependence jumps from 0 to 0.4 between steps 900 and 1000: a post-hoc-only series
    copy = tmp_path / "run"
    shutil.copytree(probed_run, copy)
    store = MetricsStore(open_run(copy).dir.metrics_db)
    store.write([(step, "patching", "z_dependence", None, None, 0.4 if step >= 1000 else 0.0, "checkpoint")
                 for step in range(200, 2200, 100)])
    store.close()
    text = write_report(copy).read_text()
    table = text.split("## Detected transitions", 1)[1].split("## Figures", 1)[0]
    assert "| patching | z_dependence | – | – |" in table


@pytest.mark.parametrize("fixture", ["run_dir", "probed_run"])
def test_report_does_not_import_torch(fixture, request):
    path = request.getfixturevalue(fixture)
    code = (
        "import sys; from phaselens.report import write_report; "
        f"write_report({str(path)!r}); assert 'torch' not in sys.modules, 'the report imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
