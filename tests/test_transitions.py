"""The transition detector on synthetic series: sharp moves are found with their windows, slow drifts are not."""

from __future__ import annotations

import numpy as np
import pytest

from phaselens.analysis.transitions import find_transitions

STEPS = np.arange(0, 3000, 5)


def sigmoid(center: float, width: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(STEPS - center) / width))


def noisy(values: np.ndarray, sigma: float = 0.02, seed: int = 0) -> np.ndarray:
    return values + np.random.default_rng(seed).normal(0, sigma, len(values))


def test_a_sharp_drop_is_found_with_its_step_inside_its_window():
    (t,) = find_transitions(STEPS, noisy(4.0 - 3.0 * sigmoid(1200, 30)))
    assert t.start <= t.step <= t.end
    assert abs(t.step - 1200) <= 30 and 1050 <= t.start < 1200 < t.end <= 1350
    assert t.before == pytest.approx(4.0, abs=0.15) and t.after == pytest.approx(1.0, abs=0.15)  # within 5% of the move


def test_two_drops_of_one_series_are_both_found_in_order():
    values = noisy(4.0 - 2.5 * sigmoid(1100, 25) - 0.6 * sigmoid(2100, 40))
    found = find_transitions(STEPS, values)
    assert [round(t.step, -2) for t in found] == [1100, 2100]
    assert all(t.start <= t.step <= t.end for t in found)


def test_a_slow_drift_is_not_a_transition():
    assert find_transitions(STEPS, noisy(4.0 - 0.5 * STEPS / STEPS[-1], sigma=0.01)) == []


@pytest.mark.parametrize("seed", range(4))
def test_drifts_around_a_drop_are_not_reported_and_every_step_lies_in_its_window(seed):
    # the demo's copy loss in miniature: a slow slide, a sharp drop, a slow slide, a second drop
    values = 4.16 - 0.2 * np.clip(STEPS / 1000, 0, 1) - 2.6 * sigmoid(1130, 30)
    values -= 0.3 * np.clip((STEPS - 1300) / 600, 0, 1) + 0.6 * sigmoid(2100, 50)
    found = find_transitions(STEPS, noisy(values, seed=seed))
    assert [round(t.step, -2) for t in found] == [1100, 2100]
    assert all(t.start <= t.step <= t.end for t in found)


def test_a_bump_up_then_down_gives_two_transitions():
    found = find_transitions(STEPS, noisy(1.0 + sigmoid(1000, 20) - sigmoid(1800, 20)))
    assert [(round(t.step, -2), t.after > t.before) for t in found] == [(1000, True), (1800, False)]


@pytest.mark.slow
def test_demo_report_tells_both_copy_loss_drops_and_every_transition_lies_in_its_window(demo_run):
    import phaselens as pl
    from phaselens.analysis.induction import summarize_induction

    path, output = demo_run
    run = pl.open_run(path)
    transitions = run.transitions()
    assert ((transitions["start"] <= transitions["step"]) & (transitions["step"] <= transitions["end"])).all()
    copy = transitions[(transitions["probe"] == "loss") & (transitions["metric"] == "copy")].sort_values("step")
    assert len(copy) == 2, "the copy loss drops twice (induction heads, then the previous-token head sharpens); no drift counts"
    first, second = copy["step"]
    assert 1000 <= first <= 1300 and 1900 <= second <= 2300
    summary = summarize_induction(run)
    assert [event.step for event in summary.story] == [first, second]
    assert any(m.startswith("prev_token L0H1 0.6") for m in summary.story[1].moved)  # 0.7 → 0.9 with the second drop
    report = (path / "report" / "report.md").read_text()
    for step in (first, second):
        assert f"- step {step} (10–90% window" in report and f"- step {step} (10–90% window" in output
