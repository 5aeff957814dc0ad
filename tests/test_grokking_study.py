"""`phaselens demo --study grokking` end to end: the grokking_small run shows what Nanda et al. (2023) report.

One session-scoped run serves every test here (the `grokking_demo` fixture: see its docstring for its cost).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import phaselens as pl
from phaselens.analysis.grokking import noise, series, summarize_grokking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def grokking_demo(tmp_path_factory) -> tuple[Path, str, float]:
    """`phaselens demo --study grokking` as a user runs it (the grokking_small preset), what it printed, and its seconds.

    About 80 s of CPU (1,400 full-batch steps, progress measures every 10); 3–5 min on the shared 2-core machine. Read-only.
    """
    out = tmp_path_factory.mktemp("grokking") / "demo"
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "phaselens.cli", "demo", "--study", "grokking", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, time.perf_counter() - began


def first_step(frame, at_least: float) -> int:
    return int(frame[frame["value"] >= at_least]["step"].iloc[0])


def test_train_accuracy_reaches_one_long_before_test_accuracy_passes_95_percent(grokking_demo):
    out, printed, _ = grokking_demo
    metrics = pl.open_run(out).metrics(probe="loss", source="live")
    train_solved = first_step(metrics[metrics["metric"] == "train_acc"], 1.0)
    test_solved = first_step(metrics[metrics["metric"] == "eval_acc"], 0.95)
    test_acc = metrics[metrics["metric"] == "eval_acc"].set_index("step")["value"]
    assert test_solved - train_solved >= 3 * train_solved  # memorised early, generalised much later
    assert test_acc[test_acc.index <= 2 * train_solved].max() < 0.5  # held-out pairs stay far from solved meanwhile
    assert f"a lag of {test_solved - train_solved} steps" in printed


def test_restricted_loss_falls_clearly_before_test_loss(grokking_demo):
    out, _, _ = grokking_demo
    summary = summarize_grokking(pl.open_run(out))
    assert summary.restricted is not None and summary.restricted.fell  # during circuit formation, beyond 3σ
    assert summary.restricted_half < summary.test_half  # halfway down earlier than the test loss
    metrics = pl.open_run(out).metrics()
    restricted = series(metrics, "grokking", "restricted_loss")
    formation_start, cleanup_start = summary.phases[1].start, summary.phases[1].end
    during = restricted[(restricted["step"] >= formation_start) & (restricted["step"] <= cleanup_start)]["value"]
    assert during.iloc[0] - during.iloc[-1] > 3 * noise(restricted["value"].to_numpy())


def test_excluded_loss_rises_during_circuit_formation(grokking_demo):
    out, _, _ = grokking_demo
    summary = summarize_grokking(pl.open_run(out))
    assert [phase.name for phase in summary.phases] == ["memorisation", "circuit formation", "clean-up"]
    assert summary.excluded is not None and summary.excluded.rose
    train = series(pl.open_run(out).metrics(), "loss", "train")
    end_of_formation = train[train["step"] <= summary.phases[1].end]["value"].iloc[-1]
    assert summary.excluded.after > 10 * end_of_formation  # without the key frequencies the training pairs are lost


def test_a_handful_of_key_frequencies_carry_the_embedding_at_the_end(grokking_demo):
    out, _, _ = grokking_demo
    run = pl.open_run(out)
    last = max(run.checkpoint_steps())
    artifact = json.loads((out / "artifacts" / "grokking" / f"step_{last:08d}.json").read_text())
    keys, norms = artifact["key_frequencies"], artifact["norms"]
    share = sum(norms[k - 1] ** 2 for k in keys) / sum(v ** 2 for v in norms)
    assert 1 <= len(keys) <= 8 < len(norms)
    assert share > 0.8
    start = series(run.metrics(), "grokking", "key_frequency_share")
    assert start["value"].iloc[0] < 0.2  # at initialisation no frequency stands out


def test_the_demo_prints_and_writes_the_grokking_report(grokking_demo):
    out, printed, seconds = grokking_demo
    report = (out / "report" / "report.md").read_text()
    assert f"report: {out / 'report' / 'report.md'}" in printed and "Phases:" in printed
    for text in ("## Phases", "| memorisation |", "| circuit formation |", "| clean-up |", "Key frequencies at step",
                 "progress_measures.png", "fourier_norms.png"):
        assert text in report
    assert (out / "report" / "progress_measures.png").stat().st_size > 10_000
    print(f"grokking demo: {seconds:.0f} s")  # the cost of this shared run, shown with -s


def test_the_report_ranks_every_component_by_what_ablating_it_costs_the_held_out_answers(grokking_demo):
    """The Components table agrees with our own mean ablation of the MLP, is ordered by its first column, and the
    component ranked first is one the generalising solution needs (its ablation costs over a nat)."""
    import torch
    import torch.nn.functional as F

    out, _, _ = grokking_demo
    report = (out / "report" / "report.md").read_text()
    table = report.split("## Components", 1)[1].split("\n\n")[2].splitlines()[2:]
    cells = {row.split("|")[1].strip(): float(row.split("|")[2]) for row in table}
    clean, ranked = cells.pop("none (clean)"), list(cells)
    assert [cells[c] for c in ranked] == sorted(cells.values(), reverse=True) and "MLP 0" in cells
    assert cells[ranked[0]] > clean + 1.0
    run = pl.open_run(out)
    model, batch = run.load_model(), run.probe_batch()
    held_out = batch.positions["answer"] & ~batch.positions["train_pairs"]  # (B, 3)
    with torch.no_grad():
        mlp = model.run_with_cache(batch.tokens)[1]["blocks.0.hook_mlp_out"].mean((0, 1), keepdim=True)  # (1, 1, d)
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: mlp.expand_as(x))])
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.tokens[:, 1:], reduction="none")  # (B, 3)
    assert float(losses[held_out].mean()) == pytest.approx(cells["MLP 0"], abs=2e-3)


def test_after_memorisation_the_circuit_runs_through_the_mlp(grokking_demo, tmp_path):
    """The study's pairs (operand b changed, answer loss) at the first checkpoint after train accuracy reaches 1.0, while
    held-out pairs are still unsolved: the faithful circuit reads the heads into the MLP and the MLP into the logits (the
    one nonlinearity of the one-layer model computes the answer). Circuits at one checkpoint, 64 pairs: about 3 s."""
    from test_circuits_training import circuits_on

    out, _, _ = grokking_demo
    metrics = pl.open_run(out).metrics(probe="loss", source="live")
    memorised = first_step(metrics[metrics["metric"] == "train_acc"], 1.0)
    step = min(s for s in pl.open_run(out).checkpoint_steps() if s > memorised)
    assert metrics[(metrics["metric"] == "eval_acc") & (metrics["step"] == step)]["value"].item() < 0.5  # not generalised yet
    run = circuits_on(out, tmp_path, [step])
    circuit = run.edges().query("method == 'exact' and in_circuit")
    print(f"step {step}: circuit {sorted(circuit['edge'])}, faithfulness {run.circuit(step).faithfulness:.2f}")
    mlps = {n for n in run.edges()["downstream"] if n.startswith("L") and n.endswith("M")}
    assert mlps and set(circuit["downstream"]) & mlps and set(circuit["upstream"]) & mlps  # into and out of an MLP
    assert run.circuit(step).faithfulness >= 0.8
