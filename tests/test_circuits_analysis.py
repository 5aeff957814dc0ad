"""Circuits over training (`phaselens.analysis.circuits`) on small circuits artifacts written by the probe's own writer:
Jaccard and weighted Jaccard by hand, bootstrap bounds, edge births, Spearman agreement, the stored rows and the
report section."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

import phaselens as pl
from phaselens.analysis.circuits import (Birth, circuit_stability, edge_births, method_agreement, score_se, spearman,
                                         store_circuit_analysis)
from phaselens.store.circuit_artifact import CircuitArtifact, EdgeRecord, circuits_path, graph_columns, write_circuits

EDGES = ["embed->L0H0.v", "L0H0->L1H0.k", "L0H1->L1H0.q", "L1H0->logits"]


def artifact(step: int, scores: list[float], circuit: list[int], *, shares: np.ndarray | None = None,
             effect: bool = True, methods: dict[str, list[float]] | None = None) -> CircuitArtifact:
    """One checkpoint's artifact: `scores` by exact (the circuit method), `circuit` the indices in it, `shares` (E, B)."""
    by_method = {"exact": scores, **(methods or {})}
    edges = [EdgeRecord(name, name.split("->")[0], name.split("->")[1].split(".")[0],
                        name.split(".")[1] if "." in name else "logits", {m: v[i] for m, v in by_method.items()},
                        i in circuit and effect)
             for i, name in enumerate(EDGES[:len(scores)])]
    B = 0 if shares is None else shares.shape[1]
    return CircuitArtifact(list(by_method), 5, "exact", 0.8, 1.0, 4.0, 0.9 if effect else math.nan,
                           {"patch": "source", "read": "copy", "corrupt": "fresh", "seed": 0, "sequences": B, "rows": B},
                           edges, step=step, has_effect=effect, read_counts=[10] * B,
                           per_sequence=[] if shares is None else shares.tolist())


def values(frame: pd.DataFrame, metric: str) -> dict[int, float]:
    rows = frame[frame["metric"] == metric]
    return dict(zip(rows["step"], rows["value"]))


def test_jaccard_and_weighted_jaccard_by_hand_and_nan_where_a_checkpoint_claims_no_circuit():
    arts = [artifact(0, [2.0, 1.0, 0.0, 0.1], [0, 1]),  # C = {a, b}, w = (2, 1, 0, 0)
            artifact(10, [0.0, -3.0, 1.0, 0.2], [1, 2]),  # C = {b, c}, w = (0, 3, 1, 0): |score| weighs
            artifact(20, [0.5, 0.5, 0.5, 0.5], [0, 1], effect=False),  # no clear clean/corrupt gap: no circuit
            artifact(30, [0.0, -3.0, 1.0, 0.2], [1, 2])]
    frame = circuit_stability(arts, resamples=20)
    assert values(frame, "jaccard_prev")[10] == pytest.approx(1 / 3)
    assert values(frame, "weighted_jaccard_prev")[10] == pytest.approx(1 / 6)  # min: b 1; max: a 2 + b 3 + c 1
    assert values(frame, "jaccard_final")[0] == pytest.approx(1 / 3) and values(frame, "jaccard_final")[30] == 1
    assert values(frame, "weighted_jaccard_final")[10] == 1
    for metric in ("jaccard_prev", "weighted_jaccard_prev", "jaccard_final"):
        assert math.isnan(values(frame, metric)[20])  # the step without a circuit ...
    assert math.isnan(values(frame, "jaccard_prev")[30])  # ... and the comparison with it
    assert 0 not in values(frame, "jaccard_prev")  # the first checkpoint has no previous one
    assert all(math.isnan(v) for v in values(frame, "jaccard_prev_lo").values())  # no per-sequence split: no bounds


def noisy(means: list[float], sequences: int, seed: int) -> np.ndarray:
    """Per-sequence shares (E, B) of scores with these means: each sequence's value is the mean plus unit noise."""
    x = np.asarray(means)[:, None] + np.random.default_rng(seed).normal(0, 1, (len(means), sequences))  # (E, B)
    x -= x.mean(1, keepdims=True) - np.asarray(means)[:, None]  # the batch's score is the mean itself
    return x / sequences


def stability_with(sequences: int) -> pd.DataFrame:
    # a clear top-2 circuit whose weights move between the checkpoints, and a weak pair of edges outside it
    first, second = [4.0, 3.0, 0.3, 0.2], [3.0, 4.5, 0.2, 0.3]
    arts = [artifact(0, first, [0, 1], shares=noisy(first, sequences, 1)),
            artifact(10, second, [0, 1], shares=noisy(second, sequences, 2))]
    return circuit_stability(arts, resamples=400)


def test_bootstrap_bounds_over_sequences_contain_the_value_and_shrink_with_more_sequences():
    widths = {}
    for sequences in (8, 128):
        frame = stability_with(sequences)
        point = values(frame, "weighted_jaccard_prev")[10]
        lo, hi = values(frame, "weighted_jaccard_prev_lo")[10], values(frame, "weighted_jaccard_prev_hi")[10]
        assert lo <= point <= hi and lo < hi
        assert values(frame, "jaccard_prev_lo")[10] == values(frame, "jaccard_prev_hi")[10] == 1  # the top 2 never swap
        widths[sequences] = hi - lo
    assert widths[128] < widths[8] / 2  # 16× the sequences: about a quarter of the width


def test_score_se_is_the_standard_error_of_the_per_sequence_mean():
    x = np.array([[1.0, 2.0, 4.0, 7.0]])  # (E=1, B=4), equal counts: shares = x / B
    assert score_se(x / 4, np.ones(4))[0] == pytest.approx(x.std(ddof=1) / 2)
    assert score_se(x[:, :1], np.ones(1))[0] == 0  # one sequence: no spread to tell


def test_an_edge_is_born_where_it_passes_half_its_final_score_and_stays_in_the_circuit():
    # per edge, five checkpoints: (scores, in circuit)
    a = ([0.0, 0.2, 0.6, 0.9, 1.0], [0, 0, 1, 1, 1])  # crosses half at 20 and stays: born at 20
    b = ([0.0, 0.8, 0.1, 0.7, 1.0], [0, 1, 0, 1, 1])  # above half at 10, drops out again: born at 30
    c = ([0.0, 0.6, -0.7, -0.8, -1.0], [0, 1, 1, 1, 1])  # the wrong sign at 10: born at 20, with a negative score
    d = ([0.9, 0.9, 0.9, 0.9, 0.05], [1, 1, 1, 1, 0])  # not in the final circuit: never born
    arts = [artifact(10 * s, [e[0][s] for e in (a, b, c, d)], [i for i, e in enumerate((a, b, c, d)) if e[1][s]])
            for s in range(5)]
    births = {birth.edge: birth for birth in edge_births(arts)}
    assert {name: birth.step for name, birth in births.items()} == {EDGES[0]: 20, EDGES[1]: 30, EDGES[2]: 20}
    assert births[EDGES[2]].final == -1.0
    assert not any(birth.clear for birth in births.values())  # no per-sequence split: no standard error, no claim


def test_a_birth_is_clear_only_where_the_final_score_stands_out_of_its_noise():
    final = [2.0, 0.1, 0.0, 0.0]
    shares = noisy(final, 64, 0)  # SE ≈ 1/8: 2.0 is 16 SE from zero, 0.1 under one
    arts = [artifact(0, [0.0, 0.0, 0.0, 0.0], [0, 1]), artifact(10, final, [0, 1], shares=shares)]
    births = {b.edge: b for b in edge_births(arts)}
    assert births[EDGES[0]].clear and not births[EDGES[1]].clear
    assert births[EDGES[0]].final_se == pytest.approx(1 / 8, rel=0.3)
    assert Birth("x", 0, 1.0, 0.0).clear is False


def test_spearman_of_eap_and_eap_ig_against_exact_at_every_step_where_both_ran():
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)  # 1 − 6·2/(4·15)
    assert math.isnan(spearman(np.array([1, 2, 3]), np.array([5, 5, 5])))
    exact = [0.1, 2.0, 1.0, 0.5]
    arts = [artifact(0, exact, [1], methods={"eap": [0.2, 3.0, 1.5, 0.4], "eap_ig": [0.5, 0.4, 0.3, 0.2]}),
            CircuitArtifact(["eap"], 5, "eap", 0.8, 1.0, 4.0, 0.9, {}, [], step=10)]  # exact did not run: no row
    table = method_agreement(arts)
    assert list(table["step"]) == [0, 0]
    by_method = dict(zip(table["method"], table["spearman"]))
    assert by_method["eap"] == pytest.approx(1.0) and by_method["eap_ig"] == pytest.approx(-0.2)  # d = (3, 1, 1, 1)


def write_artifacts(run_dir, arts: list[CircuitArtifact]) -> None:
    for a in arts:
        write_circuits(circuits_path(run_dir / "artifacts" / "circuits", a.step), a)


def test_stored_rows_are_recomputed_whole_and_read_like_any_metric(run_copy):
    growing = [[0.0, 0.0, 0.0, 0.0], [1.5, 0.2, 0.0, 0.0], [2.0, 1.0, 0.1, 0.0]]
    write_artifacts(run_copy, [artifact(s, g, [0, 1] if s else [0], shares=noisy(g, 16, s))
                               for s, g in zip((0, 10, 20), growing)])
    run = pl.open_run(run_copy)
    assert store_circuit_analysis(run) > 0
    rows = run.metrics(probe="circuits", source="checkpoint")
    assert {"jaccard_prev", "jaccard_final_lo", "weighted_jaccard_final_hi", "spearman_eap"} - set(rows["metric"]) \
        == {"spearman_eap"}  # no EAP here
    born = rows[rows["metric"].str.startswith("edge_birth:")]
    assert dict(zip(born["metric"], born["step"])) == {"edge_birth:" + EDGES[0]: 10, "edge_birth:" + EDGES[1]: 20}
    # measured again without the second edge in the final circuit: its birth row goes
    write_artifacts(run_copy, [artifact(20, growing[2], [0], shares=noisy(growing[2], 16, 20))])
    store_circuit_analysis(run)
    born = pl.open_run(run_copy).metrics(probe="circuits", metric="edge_birth:" + EDGES[1])
    assert born.empty


def test_graph_columns_put_heads_of_a_layer_in_one_column_and_mlps_after_them():
    names = ["logits", "L1H0", "L0M", "L0H1", "embed", "L0H0"]
    assert graph_columns(names) == {"embed": (0, 0), "L0H0": (1, 0), "L0H1": (1, 1), "L0M": (2, 0), "L1H0": (3, 0),
                                    "logits": (4, 0)}


def test_the_report_section_draws_the_circuits_and_tells_births_beyond_noise(run_copy, induction_run, tmp_path):
    from phaselens.report.circuits import circuits_section

    assert circuits_section(pl.open_run(induction_run), tmp_path) is None  # a run the probe never measured: no section
    growing = [[0.0, 0.0, 0.0, 0.0], [2.5, 0.05, 0.0, 0.0], [3.0, 0.1, 0.02, 0.0]]
    write_artifacts(run_copy, [artifact(s, g, [0, 1] if s else [0], shares=noisy(g, 64, s), methods={"eap": g[::-1]})
                               for s, g in zip((0, 10, 20), growing)])
    text = circuits_section(pl.open_run(run_copy), tmp_path)
    for figure in ("circuit_graphs", "circuit_edges", "circuit_stability"):
        assert f"![{figure}]({figure}.png)" in text and (tmp_path / f"{figure}.png").stat().st_size > 5000
    assert "The circuit changes most at step 10" in text  # {a} -> {a, b}: the weighted Jaccard drops there, then stays
    assert f"`{EDGES[0]}` is born at step 10" in text  # 3.0 is many standard errors from zero ...
    assert f"`{EDGES[1]}` is born" not in text and "1 more edge of the final circuit" in text  # ... 0.1 is not
    assert "| step | EAP vs exact |" in text and "| 0 | – |" in text  # no ranks where exact is flat
    assert re.search(r"^\| 20 \| -?\d\.\d\d \|$", text, flags=re.M)


def test_births_are_placed_inside_next_to_or_outside_the_headline_windows():
    from phaselens.report.circuits import births_text, key_steps

    windows = pd.DataFrame({"step": [1132], "start": [1073], "end": [1230]})
    births = [Birth("a", 1100, 1.0, 0.1), Birth("b", 1300, 1.0, 0.1), Birth("c", 2000, 1.0, 0.1), Birth("d", 1100, 0.1, 0.1)]
    text = births_text(births, windows, spacing=100, label="loss/copy transition")
    assert "`a` is born at step 1,100, inside the loss/copy transition 1,073–1,230" in text
    assert "`b` is born at step 1,300, one checkpoint after the loss/copy transition" in text
    assert "`c` is born at step 2,000, outside every loss/copy transition" in text
    assert "`d`" not in text  # within noise
    steps = list(range(0, 3001, 100))
    assert key_steps(steps, windows) == [1000, 1100, 1300, 3000]  # before, inside (nearest the steepest), after, final
    assert key_steps(steps, windows.iloc[0:0]) == [0, 1000, 2000, 3000]
