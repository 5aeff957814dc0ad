"""Every benchmark still runs: each script on tiny settings ends with its JSON line.

Benchmarks measure and tests assert, so nothing here checks a ratio; but a benchmark that no
longer starts (a renamed attribute, a folder two children share) measures nothing, and only a
run finds that out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a few seconds each, in a child process

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def last_json(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == script.removesuffix(".py")
    return result


@pytest.mark.parametrize("script, args", [
    ("telemetry_overhead.py", ["--steps", "20", "--block", "10"]),
    ("z_shuffle_overhead.py", ["--steps", "20", "--block", "10"]),
    ("geometry_import.py", ["--revisions", "2", "--quick"]),
])
def test_a_training_or_import_benchmark_runs_to_its_json_line(script, args):
    result = last_json(script, *args)
    assert all(value == value for value in result.values() if isinstance(value, float))  # no NaN figures


def test_the_circuits_benchmark_runs_quick_and_eap_costs_the_same_passes_on_29_and_1519_edges(run_copy):
    result = last_json("circuits.py", "--quick", "--run", str(run_copy))
    assert (result["demo"]["edges"], result["edges"]) == (29, 1519) and result["big_exact_scaled"]
    assert result["demo"]["steps_measured"] == [20]  # the run's last checkpoint
    assert result["demo"]["passes"]["eap"] == result["big"]["passes"]["eap"] == {"forwards": 3, "backwards": 1, "sequences": 6}
    assert result["exact_s"] > 0 and result["eap_s"] > 0 and result["eap_ig_s"] > 0


def test_the_post_hoc_and_llc_benchmarks_run_on_a_run(run_copy):
    sweep = last_json("probe_sweep.py", "--run", str(run_copy), "--rounds", "1")
    assert sweep["checkpoints"] == 3 and sweep["ratio_vs_naive"] > 0
    assert sweep["rows"]["naive"] == sweep["rows"]["phaselens"]  # both sides measure the same probes
    llc = last_json("llc.py", "--run", str(run_copy), "--checkpoints", "1", "--chains", "2", "--option", "draws=4",
                    "--option", "burnin=2", "--option", "n=64", "--profile-steps", "2")
    assert llc["chains"] == 2 and llc["ratio_batched_vs_sequential"] > 0
    assert llc["components"] == 4 and llc["ratio_components_batched_vs_sequential"] > 0  # every head of the 2×2 model


def test_the_dashboard_latency_benchmark_clicks_ablate_in_the_browser(induction_run, chromium):
    result = last_json("dashboard_latency.py", "--run", str(induction_run), "--clicks", "2", "--chromium", str(chromium))
    assert result["clicks"] == 2 and result["ablate_ms_median"] > 0
