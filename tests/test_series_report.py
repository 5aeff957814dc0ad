"""The report of an imported checkpoint series says what was imported and measured, and draws its headline curves."""

from __future__ import annotations

import shutil

import phaselens as pl
from phaselens.report import write_report
from phaselens.signals.levels import final_level


def test_an_unmeasured_series_report_names_the_model_its_revisions_and_the_command_that_measures_them(imported_run, tmp_path):
    run = tmp_path / "series"
    shutil.copytree(imported_run, run)
    text = write_report(run).read_text()
    assert ("(GPTNeoXForCausalLM, 2 layers × 4 heads, d_model 32, vocabulary 320): 3 revisions (step0, step10, step30) "
            "at steps 0–30") in text
    assert f"No checkpoint measured yet: `phaselens probe {run}`" in text
    assert not (run / "report" / "series.png").exists()  # nothing measured: no curve to draw


def test_a_measured_series_report_draws_the_headline_curves_and_names_the_heads_it_drew(probed_imported_run, tmp_path):
    run = tmp_path / "probed"
    shutil.copytree(probed_imported_run, run)
    text = write_report(run).read_text()
    figure = run / "report" / "series.png"
    assert figure.stat().st_size > 10_000 and "![series](series.png)" in text
    assert "Measured on checkpoints: probes `heads` at 3 checkpoints." in text
    # the summary names the head the figure draws: the one whose induction score ends highest
    scores = pl.open_run(run).metrics(probe="heads", metric="induction").pivot_table(index="step", columns=["layer", "head"], values="value")
    layer, head = max(scores.columns, key=lambda col: final_level(scores[col]))
    assert f"the strongest induction head, L{layer}H{head}, scores {scores[(layer, head)].iloc[0]:.2f} → " in text
    # three revisions cannot show a transition, and the report says why instead of an empty list
    assert "a curve needs at least 12 measured revisions to tell a step from noise, and this series has 3" in text
    assert "Not drawn (not recorded in this run): (a) loss — probe `loss`." in text  # only heads was measured
