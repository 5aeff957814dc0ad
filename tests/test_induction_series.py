"""When do induction heads form? A GPT-NeoX series trained here on the induction task, imported and probed."""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

import phaselens as pl
from phaselens.cli import app
from phaselens.probes.heads import detection_patterns, head_score
from phaselens.series.induction_series import probe_text, save_induction_series
from test_circuits_training import circuits_on, exact, heads, into_k

STEPS = tuple(range(0, 1401, 100))  # 15 revisions (the transition detector needs at least 12); the head forms near step 800

pytestmark = pytest.mark.slow


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def probed_series(tmp_path_factory):
    """The series saved, imported with `import-hf` and probed with `phaselens probe` (heads and loss)."""
    root = tmp_path_factory.mktemp("induction_series")
    began = time.perf_counter()
    model_dir = save_induction_series(root / "model", steps=STEPS)
    print(f"training the series took {time.perf_counter() - began:.1f} s")
    text = root / "probe.txt"
    text.write_text(probe_text())
    out = root / "run"
    invoke("import-hf", model_dir, "--revisions", ",".join(f"step{s}" for s in STEPS), "--out", out,
           "--text", text, "--seq-len", 64, "--sequences", 32)
    invoke("probe", out, "--probes", "heads,loss")
    return model_dir, pl.open_run(out)


def induction_scores(run, layer: int):
    rows = run.metrics(probe="heads", metric="induction", source="checkpoint")
    return rows[rows["layer"] == layer].pivot_table(index="step", columns="head", values="value")


def test_a_layer_1_induction_head_forms_and_its_transition_is_found(probed_series):
    _, run = probed_series
    layer1 = induction_scores(run, 1)
    assert list(layer1.index) == list(STEPS)
    best = layer1.loc[STEPS[-1]].idxmax()
    assert layer1.loc[STEPS[-1], best] > 0.4
    assert layer1.loc[0].max() < 0.2  # it starts near 0: random weights attend nowhere in particular
    found = run.transitions(probe="heads", metric="induction")
    found = found[(found["layer"] == 1) & (found["head"] == best)]
    assert len(found) >= 1 and found.iloc[0]["after"] > found.iloc[0]["before"] + 0.3
    invoke("report", run.path)
    report = (run.path / "report" / "report.md").read_text()
    assert f"| heads | induction | 1 | {best} |" in report
    # the summary lists the head's rise as a headline transition with its effect size, and the figure marks it
    assert "Transitions of the headline curves" in report and f"- heads induction L1H{best}: " in report
    assert "effect " in report.split(f"- heads induction L1H{best}: ")[1].splitlines()[0]
    assert (run.path / "report" / "series.png").stat().st_size > 10_000


def test_stored_head_scores_equal_the_hf_models_own_attentions(probed_series):
    from transformers import GPTNeoXForCausalLM

    model_dir, run = probed_series
    batch = run.probe_batches()["induction"]
    D = detection_patterns(batch.tokens)
    rows = run.metrics(probe="heads", source="checkpoint")
    for step in (0, STEPS[len(STEPS) // 2], STEPS[-1]):
        model = GPTNeoXForCausalLM.from_pretrained(model_dir / f"step{step}", attn_implementation="eager").eval()
        with torch.no_grad():
            attentions = model(batch.tokens, output_attentions=True).attentions  # L x (B, H, T, T)
        for metric in ("induction", "prev_token", "duplicate"):
            stored = rows[(rows["step"] == step) & (rows["metric"] == metric)].sort_values(["layer", "head"])["value"]
            direct = torch.stack([head_score(a, D[metric]) for a in attentions]).flatten()  # (L·H,)
            torch.testing.assert_close(torch.tensor(stored.to_numpy(), dtype=torch.float32), direct, atol=1e-4, rtol=0)


def test_circuits_find_the_k_composition_edge_forming_with_the_induction_head(probed_series, tmp_path):
    """The previous-token head of layer 0 becomes the strongest input of the layer-1 induction head's key as the head
    forms (circuits at four revisions, 16 sequences: about 10 s on one core)."""
    from phaselens.analysis.circuits import circuit_artifacts, edge_births

    _, series = probed_series
    run = circuits_on(series.path, tmp_path, (0, 800, 1000, 1400), rows=16)
    induction, prev, _ = heads(run)
    scores = exact(run)
    born = {b.edge: b for b in edge_births(circuit_artifacts(run))}
    formed = run.transitions(probe="heads", metric="induction")
    for head in induction:
        k, edge = into_k(scores, head), f"L0H{prev}->L1H{head}.k"
        print(f"into L1H{head}.k:\n{k.round(3)}")
        final = k.loc[1400, f"L0H{prev}"]
        assert final > 0.5 and abs(k.loc[0, f"L0H{prev}"]) < 0.05 * final  # nothing at initialisation
        assert all(k.loc[step].idxmax() == f"L0H{prev}" for step in (1000, 1400))
        (window,) = formed[(formed["layer"] == 1) & (formed["head"] == head)].itertuples()
        assert born[edge].clear and window.start - 100 <= born[edge].step <= window.end + 100, (born[edge], window)
