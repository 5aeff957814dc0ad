"""`compare` answers the study's question: log τ fitted jointly on the axes the task declares (D = n_unique_b·K and K).

Three tiny disambiguation runs (K = 2 with 4 and 8 bases, K = 4 with 4 bases) are compared in the three ways a
grid can relate D and K: separable, collinear (D ∝ K), and D held fixed. The fit itself is checked on exact power laws.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phaselens.errors import RunError
from phaselens.sweeps import compare_runs, run_sweep
from phaselens.sweeps.compare import fit_joint
from phaselens.training.config import load_config
from phaselens.training.trainer import train

TINY = ["data.shared_first_chars=false", "model.n_layers=1", "model.d_model=32", "model.d_head=8", "model.d_mlp=64",
        "train.steps=150", "train.warmup=0", "train.checkpoint_every=150", "train.eval_every=50", "telemetry.every=5",
        "train.lr=1e-2", "train.batch_size=16"]
NAMES = {"k2_b4": "k=2_n_unique_b=4", "k2_b8": "k=2_n_unique_b=8", "k4_b4": "k=4_n_unique_b=4"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("axes") / "sweep"
    result = run_sweep("disamb_small", ["data.k,data.n_unique_b=2:4,2:8,4:4"], out, fixed=TINY, progress=False)
    assert result.ok, result.failures
    return out


def test_compare_fits_log_tau_jointly_on_d_and_k_and_says_when_points_are_too_few(grid, tmp_path):
    comparison = compare_runs([grid], out=tmp_path)
    table = comparison.table.set_index("run")
    assert table.loc[NAMES["k2_b8"], "D"] == 16 and table.loc[NAMES["k4_b4"], "K"] == 4
    joint = comparison.joint
    assert joint.axes == ["D", "K"] and joint.n == 3 and joint.points == 3 and len(joint.slopes) == 2
    # three points, three coefficients: an exact fit, and compare says so
    assert "too few distinct points" in joint.warning and np.isnan(joint.errors).all()
    tau = table["tau"].astype(float)
    predicted = np.exp(joint.intercept + joint.slopes[0] * np.log(table["D"]) + joint.slopes[1] * np.log(table["K"]))
    np.testing.assert_allclose(predicted, tau, rtol=1e-6)
    assert comparison.fits == []  # data.k and data.n_unique_b are covered by the axes: no fit of each alone
    markdown = (tmp_path / "compare.md").read_text()
    assert "## Joint fit on the study's axes" in markdown and "`D` = data.n_unique_b·data.k" in markdown
    assert (tmp_path / "tau_axes.png").stat().st_size > 0


def test_compare_says_the_grid_cannot_separate_d_and_k_when_they_move_together(grid, tmp_path):
    joint = compare_runs([grid / NAMES["k2_b4"], grid / NAMES["k4_b4"]], out=tmp_path).joint  # D = 8, 16 with K = 2, 4
    assert joint.slopes == [] and "cannot separate D and K: 2 distinct points for 3 coefficients" in joint.problem
    assert "no joint fit" in joint.text()


def test_compare_at_fixed_d_fits_k_alone_and_names_the_fixed_axis(grid, tmp_path):
    joint = compare_runs([grid / NAMES["k2_b8"], grid / NAMES["k4_b4"]], out=tmp_path).joint  # D = 16 both
    assert joint.axes == ["K"] and joint.fixed == {"D": 16.0} and "D fixed at 16" in joint.text()


def test_runs_of_different_studies_are_not_compared(grid, tmp_path):
    other = tmp_path / "induction"
    train(load_config("induction", ["train.steps=2", "train.checkpoint_every=2"]), other, progress=False)
    with pytest.raises(RunError, match="different studies"):
        compare_runs([grid / NAMES["k2_b4"], other], out=tmp_path / "cmp")


def test_a_grid_where_d_is_a_fixed_multiple_of_k_is_called_collinear():
    table = pd.DataFrame({"D": [100.0, 200.0, 400.0], "K": [2.0, 4.0, 8.0], "tau": [300.0, 500.0, 900.0]})  # a data.k sweep
    fit = fit_joint(table, "tau", ["D", "K"])
    assert fit.slopes == [] and "cannot separate D and K: they are collinear" in fit.problem


def test_the_joint_fit_recovers_exact_exponents_and_their_independence():
    d, k = np.meshgrid([500.0, 1000.0, 2000.0], [5.0, 10.0, 20.0])
    table = pd.DataFrame({"D": d.ravel(), "K": k.ravel(), "tau": 3.0 * d.ravel() ** 1.2})  # τ ∝ D^1.2, independent of K
    fit = fit_joint(table, "tau", ["D", "K"])
    assert fit.slopes == pytest.approx([1.2, 0.0], abs=1e-9) and fit.r2 == pytest.approx(1.0)
    assert fit.n == 9 and fit.points == 9 and fit.problem is None and fit.warning is None
    table.loc[0, "tau"] = None  # a run that never reached τ is left out, not counted
    assert fit_joint(table, "tau", ["D", "K"]).n == 8


def test_the_temperature_of_a_full_batch_run_is_not_a_number_so_fits_and_figures_leave_it_out():
    from phaselens.sweeps.compare import temperature

    table = pd.DataFrame({"train.lr": [1e-3, 2e-3, 1e-3], "train.batch_size": [16, 32, 0]})
    values = temperature(table)
    assert values[:2].tolist() == [1e-3 / 16, 2e-3 / 32]
    assert np.isnan(values[2])
