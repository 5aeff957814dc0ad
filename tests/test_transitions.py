"""The transition detector on synthetic series: sharp moves are found with their windows, slow drifts are not; the
demo's report tells its transitions, and a layer settled first only beyond the noise of its settle step."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from phaselens.analysis.induction import settle_steps, settling
from phaselens.signals.transitions import find_transitions

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


def _copy_drops(run):
    transitions = run.transitions()
    return transitions[(transitions["probe"] == "loss") & (transitions["metric"] == "copy")].sort_values("step")


@pytest.mark.slow
def test_demo_report_tells_every_copy_loss_drop_and_every_transition_lies_in_its_window(demo_run):
    """Holds for any seed and thread count (`make test-perturbed`): what the report says matches what was detected."""
    import phaselens as pl
    from phaselens.analysis.induction import summarize_induction

    path, output = demo_run
    run = pl.open_run(path)
    transitions = run.transitions()
    assert ((transitions["start"] <= transitions["step"]) & (transitions["step"] <= transitions["end"])).all()
    copy = _copy_drops(run)
    assert len(copy) >= 1 and (copy["after"].iloc[0] < copy["before"].iloc[0]), "the copy loss leaves chance by a drop"
    summary = summarize_induction(run)
    assert [event.step for event in summary.story] == copy["step"].tolist()
    report = (path / "report" / "report.md").read_text()
    for event in summary.story:
        assert event.start <= event.step <= event.end and event.after < event.before
        assert event.text() in report and event.text() in output


@pytest.mark.slow
def test_the_reference_demo_drops_twice_and_its_previous_token_head_sharpens_with_the_second_drop(reference_demo_run):
    """Seed 0's run (the README's): induction heads form with the first drop; the previous-token head, already formed,
    sharpens with the second (0.7 → 0.9). Windows and levels, not digits: those differ across CPUs."""
    import phaselens as pl
    from phaselens.analysis.induction import summarize_induction

    path, _ = reference_demo_run
    run = pl.open_run(path)
    copy = _copy_drops(run)
    assert len(copy) == 2, "the copy loss drops twice (induction heads, then the previous-token head sharpens); no drift counts"
    first, second = copy["step"]
    assert 1000 <= first <= 1300 and 1900 <= second <= 2300
    summary = summarize_induction(run)
    head = summary.prev_token_head
    assert head.layer == 0
    label = f"prev_token L{head.layer}H{head.head} "
    moves = [[tuple(float(v) for v in m[len(label):].split(" → ")) for m in event.moved if m.startswith(label)]
             for event in summary.story]
    (rise,), (sharpening,) = moves  # it moves with both drops
    assert rise[0] < 0.25 < 0.4 < rise[1]  # forms with the induction heads
    assert 0.5 < sharpening[0] and sharpening[1] > sharpening[0] + 0.15  # formed already, then sharpens


SETTLED = re.compile(r"for layer (\d+) from step (\d+) \((\d+)–(\d+)\)")


@pytest.mark.slow
def test_demo_says_which_layer_settled_first_only_beyond_the_noise_and_with_its_own_numbers(demo_run):
    """Holds for any seed: the settle sentence (printed when induction formed) agrees with the settle steps of the
    run's coherence at the 20%, 10% and 5% bands, names an order only when the gap exceeds the summed ranges, and
    otherwise says the layers settled together."""
    import phaselens as pl
    from phaselens.analysis.induction import summarize_induction

    path, output = demo_run
    run = pl.open_run(path)
    summary = summarize_induction(run)
    lines = [line for line in output.splitlines() if "settled" in line]
    if not summary.found:
        assert lines == []
        return
    (line,) = lines
    assert line in (path / "report" / "report.md").read_text()
    attention = run.metrics(probe="attention", source="live")
    loose, steps, tight = (settle_steps(attention, band) for band in (0.2, 0.1, 0.05))
    printed = {int(layer): (int(step), int(a), int(b)) for layer, step, a, b in SETTLED.findall(line)}
    assert printed == {layer: (steps[layer], loose[layer], tight[layer]) for layer in steps}
    (a, (step_a, lo_a, hi_a)), (b, (step_b, lo_b, hi_b)) = sorted(printed.items(), key=lambda kv: kv[1][0])
    assert lo_a <= step_a <= hi_a and lo_b <= step_b <= hi_b
    gap, noise = step_b - step_a, (hi_a - lo_a) + (hi_b - lo_b)
    if gap > noise:
        assert line.startswith(f"Layer {a} settled first: ") and f"the gap of {gap} steps to layer {b} exceeds its noise of {noise} steps" in line
    else:
        assert line.startswith(f"The layers settled together (within {gap} steps, inside the noise of {noise} steps)")


def coherence(centers: dict[int, float], width: float, seed: int = 0) -> pd.DataFrame:
    """Attention telemetry in miniature: per layer, two heads whose coherence rises 0.1 → 0.7 around its center."""
    rng = np.random.default_rng(seed)
    rows = [{"step": int(step), "probe": "attention", "metric": "coherence", "layer": layer, "head": head, "value": value}
            for layer, center in centers.items() for head in range(2)
            for step, value in zip(STEPS, 0.1 + 0.6 * sigmoid(center, width) + rng.normal(0, 0.01, len(STEPS)))]
    return pd.DataFrame(rows)


def test_layers_that_settle_far_apart_are_ordered_with_the_gap_and_its_noise():
    found = settling(coherence({0: 1800, 1: 1000}, width=30))
    assert found.first == [1]
    assert 1000 < found.steps[1] < 1200 and 1800 < found.steps[0] < 2000
    gap, noise = found.steps[0] - found.steps[1], found.pair_noise(0, 1)
    assert 0 < noise < 200 < 600 < gap
    assert found.text().startswith("Layer 1 settled first: ") and f"the gap of {gap} steps to layer 0 exceeds its noise of {noise} steps" in found.text()


@pytest.mark.parametrize("seed", range(3))
def test_layers_that_settle_within_their_noise_settled_together(seed):
    found = settling(coherence({0: 1530, 1: 1500}, width=60, seed=seed))
    gap = abs(found.steps[0] - found.steps[1])
    assert gap < found.pair_noise(0, 1) and found.first == sorted(found.steps, key=found.steps.get)
    assert found.text().startswith(f"The layers settled together (within {gap} steps, inside the noise of {found.pair_noise(0, 1)} steps)")
    assert "settled first" not in found.text()


def test_an_order_that_the_band_reverses_is_never_printed():
    # layer 0 jumps most of the way early and creeps to its end; layer 1 jumps once, between layer 0's two stages
    early_then_creep = 0.1 + 0.5 * sigmoid(800, 20) + 0.1 * np.clip((STEPS - 800) / 1600, 0, 1)
    one_jump = 0.1 + 0.6 * sigmoid(1500, 20)
    rows = [{"step": int(step), "probe": "attention", "metric": "coherence", "layer": layer, "head": 0, "value": value}
            for layer, series in enumerate((early_then_creep, one_jump)) for step, value in zip(STEPS, series)]
    attention = pd.DataFrame(rows)
    orders = {band: min(s, key=s.get) for band in (0.05, 0.1, 0.2) for s in [settle_steps(attention, band)]}
    assert len(set(orders.values())) == 2, orders  # the 5% and the 20% band disagree on who settled first
    assert "settled together" in settling(attention).text()


def test_a_measurements_own_noise_and_bounds_are_not_the_models_transitions():
    from phaselens.signals.transitions import detect_transitions

    jump = noisy(4.0 - 3.0 * sigmoid(1200, 30))
    frame = pd.DataFrame([{"step": int(s), "probe": "circuits", "metric": m, "layer": None, "head": None, "value": float(v),
                           "source": "checkpoint"}
                          for m in ("jaccard_final", "jaccard_final_lo", "llc_se", "spearman_eap") for s, v in zip(STEPS, jump)])
    assert set(detect_transitions(frame)["metric"]) == {"jaccard_final"}
    assert set(detect_transitions(frame, measurements=True)["metric"]) == {"jaccard_final", "jaccard_final_lo", "llc_se",
                                                                            "spearman_eap"}
