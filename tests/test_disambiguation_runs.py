"""Late disambiguation end to end: real training runs of `disamb_small`, post-hoc probes, the report.

One K = 10 run (shortened: 50 bases, 700 steps) is shared by the assertions about the lag; K = 1 and
b_to_a train briefly on their own.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from phaselens.analysis.disambiguation import first_target_series, plateau, summarize_disambiguation, tau
from phaselens.posthoc.runner import run_probes
from phaselens.report import write_report
from phaselens.run import open_run
from phaselens.training.config import load_config
from phaselens.training.trainer import train

LOG10 = math.log(10)
LAG_RUN = ["data.k=10", "data.n_unique_b=50", "train.steps=700", "train.checkpoint_every=50"]


def live(run, metric: str) -> pd.Series:
    rows = run.metrics(probe="loss", metric=metric, source="live")
    return rows.set_index("step")["value"].sort_index()


@pytest.fixture(scope="module")
def lag_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("disamb") / "k10"
    train(load_config("disamb_small", LAG_RUN), path, progress=False)
    result = run_probes(path, progress=False)
    assert result.ok, result.failures
    return open_run(path)


@pytest.mark.slow
def test_k10_first_target_loss_plateaus_near_log_k_then_drops(lag_run):
    metrics = lag_run.metrics()
    found = plateau(metrics, 10)
    assert found is not None and found.steps >= 150, found
    assert abs(found.level - LOG10) <= 0.15 * LOG10
    reached = tau(metrics, 10)
    assert reached is not None and reached > found.end
    assert first_target_series(metrics).iloc[-5:].median() < 0.5


@pytest.mark.slow
def test_k10_z_shuffled_loss_separates_from_the_clean_loss_at_the_drop(lag_run):
    metrics = lag_run.metrics()
    found, reached = plateau(metrics, 10), tau(metrics, 10)
    gap = live(lag_run, "z_shuffle_gap").rolling(5, center=True, min_periods=1).median()
    on_plateau = gap[(gap.index >= found.start) & (gap.index <= found.start + (found.end - found.start) // 2)]
    assert on_plateau.abs().max() < 0.15  # z ignored: shuffling it changes nothing
    assert gap[gap.index >= reached].min() > 1.0  # z used: shuffling it costs more than a nat
    separated = int(gap[gap > 0.5].index[0])
    assert found.start < separated <= reached


@pytest.mark.slow
def test_k10_z_dependence_rises_from_zero_at_the_drop(lag_run):
    metrics = lag_run.metrics()
    found = plateau(metrics, 10)
    z = lag_run.metrics(probe="patching", metric="z_dependence", source="checkpoint").set_index("step")["value"]
    assert z[z.index <= found.start + (found.end - found.start) // 2].abs().max() < 0.05
    assert z.iloc[-1] > 0.3
    drop = lag_run.metrics(probe="random_z", metric="p_drop", source="checkpoint").set_index("step")["value"]
    assert drop.iloc[0] == pytest.approx(0, abs=0.02) and drop.iloc[-1] > 0.3
    mass = lag_run.metrics(probe="attention_to", metric="mass", source="checkpoint")
    by_head = mass.pivot_table(index="step", columns=["layer", "head"], values="value")
    assert (by_head.iloc[-1] - by_head.iloc[0]).max() > 0.1  # some head turns to z


@pytest.mark.slow
def test_k10_report_has_the_figures_tau_and_the_alignment_table(lag_run):
    report = write_report(lag_run)
    text = report.read_text()
    for figure in ("dashboard.png", "attention_to_z.png", "logit_lens.png", "z_dependence.png"):
        assert (report.parent / figure).is_file() and f"]({figure})" in text
    summary = summarize_disambiguation(lag_run)
    assert f"τ = {summary.tau}" in text
    assert "## Alignment of the diagnostics" in text
    table = summary.alignment.frame().set_index("diagnostic")
    assert table.loc["first-target loss", "step"] is not None
    assert table.loc["z-shuffle gap", "overlaps"]


def test_k1_first_target_loss_falls_without_a_plateau(tmp_path):
    """K = 1 (per-base first characters, so B must be read): nothing to disambiguate, no wait."""
    path = tmp_path / "k1"
    train(load_config("disamb_small", ["data.k=1", "data.n_unique_b=50", "data.shared_first_chars=false",
                                       "train.steps=400", "train.checkpoint_every=400"]), path, progress=False)
    series = first_target_series(open_run(path).metrics())
    assert series.iloc[-5:].median() < 0.5
    # it never waits: every 100 steps the loss falls by a clear margin until it is small
    levels = series.groupby(series.index // 100).median()
    falling = levels[levels.shift(1) > 0.5]
    assert (falling < 0.9 * levels.shift(1)[falling.index]).all(), levels.round(2).tolist()


def test_b_to_a_with_unique_first_characters_ends_near_log_k(tmp_path):
    """No z: the first target of a base is one of K distinct characters, so log K is the floor."""
    path = tmp_path / "b_to_a"
    train(load_config("disamb_small", ["data.task=b_to_a", "data.k=10", "data.n_unique_b=50",
                                       "train.steps=300", "train.checkpoint_every=300"]), path, progress=False)
    run = open_run(path)
    final = first_target_series(run.metrics()).iloc[-5:].median()
    assert abs(final - LOG10) < 0.1 * LOG10
    assert run.metrics(probe="loss", metric="z_shuffled").empty  # no selector, no shuffle
    text = write_report(run).read_text()
    assert "No selector (b_to_a)" in text and "log K = log 10 = 2.30" in text
    assert (path / "report" / "dashboard.png").is_file()


@pytest.mark.parametrize("task", ["az_to_b", "a_to_b"])
def test_reversed_variants_train_probe_and_report_end_to_end(tmp_path, task):
    path = tmp_path / task
    train(load_config("disamb_small", [f"data.task={task}", "data.k=4", "data.n_unique_b=20", "train.steps=20",
                                       "train.checkpoint_every=10"]), path, progress=False)
    result = run_probes(path, progress=False)
    assert result.ok, result.failures
    run = open_run(path)
    has_selector = task == "az_to_b"
    assert (not run.metrics(probe="patching", metric="z_dependence").empty) == has_selector
    assert (not run.metrics(probe="random_z", metric="p_drop").empty) == has_selector
    assert not run.metrics(probe="logit_lens", metric="p_correct").empty
    text = write_report(run).read_text()
    assert f"task `{task}`" in text and "## Alignment of the diagnostics" in text
