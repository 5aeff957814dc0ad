"""`phaselens import-hf`: a locally saved multi-revision GPT-NeoX series as a run, probed and reported."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

import phaselens as pl
from phaselens.cli import app
from phaselens.errors import ConfigError
from phaselens.series import import_hf, pythia_schedule, revision_step
from phaselens.series.toy import save_toy_series

STEPS = (0, 20, 40, 80, 160)


def grammar_text(lines: int = 400, seed: int = 0) -> str:
    """Short sentences from a small grammar: a skewed unigram and structure a model can learn."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the bird"]
    verbs = ["sat on", "looked at", "ran to", "sang to", "found"]
    objects = ["the mat", "a tree", "the house", "the river", "a song"]
    return "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(lines))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """MODEL_DIR with step0 … step160 of one small GPT-NeoX trained on the grammar text, and that text."""
    root = tmp_path_factory.mktemp("hf")
    text = root / "probe.txt"
    text.write_text(grammar_text())
    model_dir = save_toy_series(root / "model", text.read_text(), steps=STEPS)
    return model_dir, text


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_pythia_schedule_and_step_names():
    full = pythia_schedule()
    assert full[:12] == ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64", "step128",
                         "step256", "step512", "step1000"]
    assert len(full) == 154 and full[-1] == "step143000"
    thinned = pythia_schedule(every=10)
    assert thinned[11:13] == ["step10000", "step20000"] and thinned[-1] == "step143000" and len(thinned) == 11 + 14 + 1
    assert revision_step("step143000") == 143000
    with pytest.raises(ConfigError, match="step0, step100"):
        revision_step("main")


def test_import_probe_report_gives_the_geometry_figure_and_phase_table(series, tmp_path):
    model_dir, text = series
    out = tmp_path / "series"
    invoke("import-hf", model_dir, "--revisions", ",".join(f"step{s}" for s in STEPS), "--out", out,
           "--text", text, "--seq-len", 24, "--sequences", 8)
    run = pl.open_run(out)
    assert run.imported and run.checkpoint_steps() == list(STEPS)
    # only the text probe batch and the induction batch: no weights are copied
    assert sorted(p.name for p in out.rglob("*.safetensors")) == ["induction_batch.safetensors", "probe_batch.safetensors"]
    assert json.loads((out / "checkpoints" / "step_00000040" / "reference.json").read_text())["revision"] == "step40"
    assert run.config["model"]["kind"] == "hf" and run.probe_batch().tokens.shape == (8, 24)
    invoke("report", out)  # before any probe: the report says which command measures which defaults
    assert (f"No checkpoint measured yet: `phaselens probe {out}` measures the default probes "
            "(attention, heads, loss, logit_lens, geometry).") in (out / "report" / "report.md").read_text()

    invoke("probe", out)  # the imported series' default probes, head scores on its induction batch
    rows = run.metrics(source="checkpoint")
    assert set(rows["probe"]) == {"attention", "heads", "loss", "logit_lens", "geometry"}  # patching only by name: costly at size
    ie = rows[(rows["probe"] == "geometry") & (rows["metric"] == "interaction_energy")]
    assert sorted(ie["layer"].unique()) == [0, 1, 2, 3] and len(ie) == 4 * len(STEPS)
    loss = rows[(rows["probe"] == "loss")].set_index("step")["value"]
    assert loss[160] < loss[0] - 0.5  # the revisions really are a training series, measured each on its own weights

    invoke("report", out)
    report = (out / "report" / "report.md").read_text()
    assert f"Measured on checkpoints: probes `attention`, `geometry`, `heads`, `logit_lens`, `loss` at {len(STEPS)} checkpoints." in report
    assert (out / "report" / "geometry.png").stat().st_size > 10_000
    assert "## Residual-stream geometry" in report and "| phase | steps | KL |" in report
    assert ": steps 0–" in report  # "KL falling while IE rises: steps 0–40" and so on


def test_load_model_boots_the_referenced_revision_through_the_bridge(series, tmp_path):
    from transformers import GPTNeoXForCausalLM

    model_dir, text = series
    out = import_hf(model_dir, tmp_path / "run", revisions=["step0", "step160"], text=text, seq_len=16, sequences=4)
    run = pl.open_run(out)
    tokens = run.probe_batch().tokens
    bridge = run.load_model(160)
    logits, cache = bridge.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post", "ln_final.hook_normalized"])
    assert set(cache.keys()) >= {"blocks.1.hook_resid_post", "ln_final.hook_normalized"}
    reference = GPTNeoXForCausalLM.from_pretrained(model_dir / "step160", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(logits, reference(tokens).logits, atol=1e-4)
    assert not torch.allclose(run.load_model(0)(tokens), logits, atol=1e-2)


def test_head_scores_attention_to_and_patching_read_the_series_induction_batch(series, tmp_path):
    """The induction batch: ordinary ids of the model's tokenizer, a segment repeated at a variable offset."""
    from transformers import AutoTokenizer

    model_dir, text = series
    out = import_hf(model_dir, tmp_path / "run", revisions=["step0", "step160"], text=text, seq_len=32, sequences=6)
    run = pl.open_run(out)
    batch = run.probe_batches()["induction"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "step0")
    assert batch.tokens.shape == (6, 32) and int(batch.tokens.max()) < len(tokenizer)
    assert not set(batch.tokens.flatten().tolist()) & set(tokenizer.all_special_ids)
    offsets = {int(r.nonzero()[0, 0]) for r in batch.positions["copy"]}
    assert len(offsets) > 1  # the repeat starts at a different place in different sequences
    invoke("probe", out, "--probes", "heads,attention_to,patching")
    rows = run.metrics(source="checkpoint")
    induction = rows[(rows["probe"] == "heads") & (rows["metric"] == "induction")]
    assert len(induction) == 2 * 2 * 4 and induction["value"].between(0, 1).all()
    effect = rows[(rows["probe"] == "patching") & (rows["metric"] == "effect")]
    assert sorted(effect["layer"].unique()) == [0, 1, 2]


def test_import_refuses_missing_revisions_and_an_existing_run(series, tmp_path):
    model_dir, text = series
    with pytest.raises(ConfigError, match=r"revision\(s\) \['step999'\]"):
        import_hf(model_dir, tmp_path / "a", revisions=["step0", "step999"], text=text)
    with pytest.raises(ConfigError, match="exactly one"):
        import_hf(model_dir, tmp_path / "b", text=text)
    import_hf(model_dir, tmp_path / "c", revisions=["step0"], text=text, seq_len=16, sequences=2)
    with pytest.raises(pl.RunError, match="already holds a run"):
        import_hf(model_dir, tmp_path / "c", revisions=["step0"], text=text)


def test_dashboard_serves_an_imported_series_timeline_and_its_model_view(series, tmp_path):
    from fastapi.testclient import TestClient

    from phaselens.server import build

    model_dir, text = series
    out = import_hf(model_dir, tmp_path / "run", revisions=["step0"], text=text, seq_len=16, sequences=4)
    app, _ = build([out])
    with TestClient(app, base_url="http://127.0.0.1:8050") as client:
        assert client.get("/api/runs").status_code == 200
        arch = client.post("/api/model/architecture", json={"run": out.name, "step": 0})
    assert arch.status_code == 200, arch.text  # the model view reads it through its adapter (tests/test_dashboard_models.py)
    assert arch.json()["architecture"] == "GPTNeoXForCausalLM" and arch.json()["tokenizer"] == "hf"


def test_revisions_all_and_a_run_with_an_ellipsis_name_the_series_folders(series, tmp_path):
    """The README's `--revisions step0,...` recipes as typed: `all` takes every step{N} folder, in step order, and
    `step0,step20,...,step80` every 20 steps; the default probe length fits a model whose context is 64."""
    from phaselens.series.hf import expand_revisions

    model_dir, text = series
    (model_dir / "step7").mkdir()  # a folder without a saved model is not a revision
    (model_dir / "notes").mkdir()
    assert expand_revisions(["all"], str(model_dir)) == [f"step{s}" for s in STEPS]
    assert expand_revisions(["step0", "step20", "...", "step80"], str(model_dir)) == ["step0", "step20", "step40", "step60", "step80"]
    with pytest.raises(ConfigError, match="constant"):
        expand_revisions(["step0", "step30", "...", "step80"], str(model_dir))
    with pytest.raises(ConfigError, match="not a directory"):
        expand_revisions(["all"], "EleutherAI/pythia-70m")
    result = invoke("import-hf", model_dir, "--revisions", "all", "--out", tmp_path / "all", "--text", text, "--sequences", "2")
    run = pl.open_run(tmp_path / "all")
    assert run.checkpoint_steps() == list(STEPS), result.output
    assert run.config["data"]["seq_len"] == 64  # min(128, the model's context)
    too_long = CliRunner().invoke(app, ["import-hf", str(model_dir), "--revisions", "step0", "--out", str(tmp_path / "long"),
                                        "--text", str(text), "--seq-len", "500"])
    assert too_long.exit_code != 0 and "--seq-len 64 or less" in too_long.output and "Traceback" not in too_long.output
