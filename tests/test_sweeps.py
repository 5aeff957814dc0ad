"""`phaselens sweep` and `phaselens compare`: a tiny 2×2 grid (learning rate × batch size) on the
local backend and on a local Ray cluster, resumed, and compared with a log–log fit of τ."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from phaselens.cli import app
from phaselens.store.run_dir import RunDir
from phaselens.sweeps import compare_runs, run_sweep

# K = 2 on 4 bases with a one-layer model: τ comes within the 150 steps, earlier for the larger learning rate
TINY = ["data.k=2", "data.n_unique_b=4", "data.shared_first_chars=false", "model.n_layers=1", "model.d_model=32",
        "model.d_head=8", "model.d_mlp=64", "train.steps=150", "train.warmup=0", "train.checkpoint_every=50",
        "train.eval_every=50", "telemetry.every=5"]
GRID = ["train.lr=3e-3,1e-2", "train.batch_size=16,32"]
NAMES = ["lr=3e-3_batch_size=16", "lr=3e-3_batch_size=32", "lr=1e-2_batch_size=16", "lr=1e-2_batch_size=32"]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "local"
    result = run_sweep("disamb_small", GRID, out, fixed=TINY, progress=False)
    assert result.ok, result.failures
    return out, result


def test_a_sweep_trains_every_grid_point_into_its_own_run_directory(local_sweep):
    out, result = local_sweep
    assert [p.name for p in result.points] == NAMES
    assert all(p.status == "finished" for p in result.points)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["axes"] == [["train.lr", ["3e-3", "1e-2"]], ["train.batch_size", ["16", "32"]]]
    config = RunDir(out / "lr=1e-2_batch_size=16").read()["config"]
    assert config["train"]["lr"] == 1e-2 and config["train"]["batch_size"] == 16 and config["data"]["k"] == 2


def test_compare_writes_the_table_and_fits_tau_against_the_swept_hyperparameters(local_sweep, tmp_path):
    out, _ = local_sweep
    comparison = compare_runs([out], out=tmp_path)
    table = pd.read_csv(tmp_path / "compare.csv")
    assert sorted(table["run"]) == sorted(NAMES)
    assert {"train.lr", "train.batch_size", "data.k", "tau", "step_first_target", "step_z_shuffle_gap"} <= set(table.columns)
    assert table["tau"].notna().all()
    fast, slow = (table[table["train.lr"] == lr]["tau"].mean() for lr in (1e-2, 3e-3))
    assert fast < slow  # a larger step size uses z sooner
    fits = {fit.key: fit for fit in comparison.fits}
    assert set(fits) == {"train.lr", "train.batch_size", "train.lr/train.batch_size"}
    assert fits["train.lr"].slope < 0 and 0 <= fits["train.lr"].r2 <= 1 and fits["train.lr"].n == 4
    markdown = (tmp_path / "compare.md").read_text()
    assert "| run |" in markdown and "R²" in markdown
    assert (tmp_path / "tau_fit.png").stat().st_size > 0


def test_compare_on_the_command_line_prints_the_table_and_the_fit(local_sweep, tmp_path):
    out, _ = local_sweep
    result = CliRunner().invoke(app, ["compare", str(out / NAMES[0]), str(out / NAMES[2]), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "τ ∝ train.lr^" in result.output and "R²" in result.output  # the two runs differ only in lr
    assert (tmp_path / "compare.csv").is_file()


def test_a_sweep_resumes_skipping_finished_runs_and_continuing_unfinished_ones(local_sweep, tmp_path):
    out, first = local_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    unfinished = RunDir(copy / NAMES[1])
    shutil.rmtree(unfinished.checkpoint(150))  # killed after its checkpoint at step 100
    unfinished.update(status="running")
    result = run_sweep("disamb_small", GRID, copy, fixed=TINY, progress=False)
    assert [p.status for p in result.points] == ["skipped", "finished", "skipped", "skipped"]
    assert unfinished.read()["status"] == "finished" and unfinished.checkpoint_steps()[-1] == 150
    resumed = compare_runs([copy], out=tmp_path / "cmp").table.set_index("run")
    original = compare_runs([out], out=tmp_path / "cmp0").table.set_index("run")
    assert resumed.loc[NAMES[1], "tau"] == original.loc[NAMES[1], "tau"]  # resumed exactly


def test_a_ray_sweep_runs_one_task_per_run_and_gives_the_same_taus(local_sweep, tmp_path):
    pytest.importorskip("ray")
    out, _ = local_sweep
    result = run_sweep("disamb_small", GRID, tmp_path / "ray", fixed=TINY, backend="ray", workers=2, progress=False)
    assert result.ok, result.failures
    assert sorted(p.name for p in result.points) == sorted(NAMES)
    on_ray = compare_runs([tmp_path / "ray"], out=tmp_path / "cmp").table.set_index("run")["tau"]
    local = compare_runs([out], out=tmp_path / "cmp0").table.set_index("run")["tau"]
    assert on_ray.sort_index().tolist() == local.sort_index().tolist()


def test_a_bad_axis_is_refused_before_anything_trains(tmp_path):
    from phaselens.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lrr"):
        run_sweep("disamb_small", ["train.lrr=1e-3,2e-3"], tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
