"""The front page's and the docs' Python examples run as written (with fewer steps).

Blocks come from README.md, docs/getting-started.md, docs/tutorials/own-training-loop.md and
docs/concepts/probes.md (each marked `<!-- run by tests/test_readme.py -->`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_docs import page_block

ROOT = Path(__file__).resolve().parents[1]


def test_own_loop_telemetry_cache_metrics_and_a_custom_probe_run_as_written(tmp_path, monkeypatch):
    loop = page_block("docs/tutorials/own-training-loop.md", "pl.Telemetry(").replace("range(200)", "range(6)")
    cache = page_block("docs/concepts/probes.md", "run_with_cache(batch.tokens)")
    probe = page_block("docs/concepts/probes.md", "@pl.register_probe")
    monkeypatch.chdir(tmp_path)  # the loop writes runs/own-loop
    namespace: dict = {}
    exec(loop, namespace)
    frame = namespace["frame"]
    assert set(frame["probe"]) == {"attention", "heads", "loss"}
    assert sorted(frame["step"].unique()) == list(range(6))
    run = namespace["run"]  # the run directory the loop wrote, opened as the page opens it
    assert run.status == "finished" and run.name == "own-loop" and run.checkpoint_steps() == [0]
    assert len(run.metrics()) == len(frame) and len(run.metrics(probe="heads", metric="induction")) > 0
    exec(cache, namespace)
    exec(probe, namespace)
    pl = namespace["pl"]
    model = namespace["model"]
    with pl.Telemetry(model, probes=["resid_norm"]) as telemetry:
        tokens = torch.randint(0, 64, (4, 64))
        with telemetry.step(0, tokens):
            model(tokens)
        rows = telemetry.dataframe()
    assert list(rows["metric"].unique()) == ["mean_norm"] and len(rows) == 2
    assert (rows["value"] > 0).all()


@pytest.mark.slow  # report, probe and serve of the page's own-loop run: ~10 s
def test_the_own_loop_pages_report_probe_and_serve_commands_read_its_run(tmp_path, monkeypatch):
    from test_docs import run_shell_block

    monkeypatch.chdir(tmp_path)
    exec(page_block("docs/tutorials/own-training-loop.md", "pl.Telemetry(").replace("range(200)", "range(6)"), {})
    ran = run_shell_block(page_block("docs/tutorials/own-training-loop.md", "phaselens report runs/own-loop", "bash"), tmp_path)
    assert [line.split()[1] for line in ran] == ["report", "probe", "serve"]
    assert "loss on the measured batches" in (tmp_path / "runs" / "own-loop" / "report" / "report.md").read_text()
    import phaselens as pl

    checkpoint_rows = pl.open_run(tmp_path / "runs" / "own-loop").metrics(source="checkpoint")
    assert set(checkpoint_rows["step"]) == {0}  # `phaselens probe` measured the saved checkpoint


def test_the_readmes_python_block_reads_a_trained_run(induction_run, tmp_path, monkeypatch):
    shutil.copytree(induction_run, tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(page_block("README.md", "pl.open_run"), namespace)
    assert namespace["run"].checkpoint_steps() == [0, 10, 20]
    assert namespace["model"].cfg.n_layers == 2


def test_the_two_commands_are_the_makefile_targets_that_train_the_demo_and_run_the_suite():
    for page in ("README.md", "docs/getting-started.md"):
        assert page_block(page, "make demo", "bash").split() == ["make", "demo", "make", "test"]
    demo = subprocess.run(["make", "-n", "demo", "TORCH=skip"], cwd=ROOT, capture_output=True, text=True)
    test = subprocess.run(["make", "-n", "test", "TORCH=skip"], cwd=ROOT, capture_output=True, text=True)
    assert demo.returncode == 0 and re.search(r"bin/phaselens demo\s*$", demo.stdout, flags=re.M), demo.stdout
    assert test.returncode == 0 and "-m pytest" in test.stdout, test.stdout


@pytest.mark.slow
def test_the_demo_prints_what_the_front_page_shows(demo_run):
    """`phaselens demo` (what `make demo` runs after installing) prints lines of the shapes the README's example has."""
    _, printed = demo_run
    example = (ROOT / "README.md").read_text().split("```text\n", 1)[1].split("```", 1)[0]
    for line in example.splitlines()[:4]:
        prefix = re.split(r"\d|runs/", line, maxsplit=1)[0]  # up to the first number or path (the test trains elsewhere)
        assert prefix in printed, f"the demo no longer prints a line starting {prefix!r}:\n{printed}"
