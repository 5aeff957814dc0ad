"""docs/tutorials/dashboard-circuits.md runs as written (on the 20-step induction run, with fewer sequences):
post-hoc circuits locally and on Ray give the same edges, `phaselens serve` serves them to the circuit view,
and live circuits train and read back as the page says."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

import phaselens as pl
from phaselens.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "dashboard-circuits.md"
MARK = "<!-- run by tests/test_dashboard_circuits_docs.py -->"
CHEAP = ["--probe-option", "circuits.rows=4", "--probe-option", "circuits.method=exact"]  # fewer sequences, one method


def blocks() -> list[tuple[str, str]]:
    return re.findall(re.escape(MARK) + r"\n```(python|bash)\n(.*?)```", DOCS.read_text(), flags=re.S)


def run_cli(line: str, replace: dict[str, str], extra: list[str] = ()) -> None:
    """One `phaselens ...` line of the page, in this process (no second start-up), with `replace` applied."""
    for old, new in replace.items():
        line = line.replace(old, new)
    result = CliRunner().invoke(app, [*shlex.split(line)[1:], *extra])
    assert result.exit_code == 0, result.output


def steps_served(url: str, wait: float = 60.0) -> list[int]:
    """The steps the circuits route answers with, once the server (announced, still starting) listens."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=wait) as answer:
                return json.load(answer)["steps"]
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_every_command_block_of_the_page_is_run_here():
    text = DOCS.read_text()
    assert len(blocks()) == 4 == len(re.findall(r"^```(?:python|bash)$", text, flags=re.M))


@pytest.mark.slow
def test_the_circuits_page_runs_as_written(induction_run, tmp_path):
    (serve_block, ray_block, train_block, python_block) = [code for _, code in blocks()]
    local, remote = tmp_path / "demo", tmp_path / "demo_ray"
    shutil.copytree(induction_run, local)
    shutil.copytree(induction_run, remote)

    probe_line, serve_line = serve_block.strip().splitlines()
    run_cli(probe_line, {"runs/demo": str(local)}, CHEAP)
    run_cli(ray_block.strip(), {"runs/demo": str(remote), "--workers 4": "--workers 1"}, [*CHEAP, "--steps", "20"])
    assert pl.open_run(local).circuit_steps() == [0, 10, 20] and pl.open_run(remote).circuit_steps() == [20]
    local_edges = pl.open_run(local).edges()
    assert local_edges[local_edges["step"] == 20].reset_index(drop=True).equals(pl.open_run(remote).edges())

    # `phaselens serve` as typed, on a free port; the circuit view's first request answers with the measured steps
    args = shlex.split(serve_line.replace("runs/demo", str(local)))[1:] + ["--port", "0"]
    server = subprocess.Popen([sys.executable, "-m", "phaselens.cli", *args], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:"), url
        assert steps_served(f"{url}api/runs/demo/circuits") == [0, 10, 20]
    finally:
        server.terminate()
        server.wait(timeout=30)

    live = tmp_path / "live"
    run_cli(train_block.strip(), {"runs/live": str(live), "circuits.every=50": "circuits.every=5"},
            ["train.steps=20", "train.checkpoint_every=10", "telemetry.every=5", "telemetry.probe_options.circuits.rows=4",
             "telemetry.probe_options.circuits.method=exact"])
    namespace: dict = {}
    exec(python_block.replace("runs/live", str(live)), namespace)
    assert sorted(namespace["size"]["step"]) == [0, 5, 10, 15]
    assert len(namespace["k_edge"]) >= 4
