"""`phaselens export --format hf-series`: a run's checkpoints as step{N} Hugging Face revisions that
`phaselens import-hf` reads back and measures to the same values."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from phaselens.cli import app
from phaselens.run import open_run

TOLERANCE = 1e-5


def export(run, out):
    result = CliRunner().invoke(app, ["export", str(run), "--format", "hf-series", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def import_back(series, out, *options):
    result = CliRunner().invoke(app, ["import-hf", str(series), "--revisions", "all", "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return out


def assert_same_values(a, b):
    """Two metric frames hold the same series at the same steps, equal within float tolerance."""
    key = ["probe", "metric", "step", "layer", "head"]
    a, b = (frame.sort_values(key).reset_index(drop=True) for frame in (a, b))
    assert len(a) and a[key].astype(str).equals(b[key].astype(str))
    assert (a["value"] - b["value"]).abs().max() <= TOLERANCE


def test_an_imported_series_exports_and_imports_back_to_the_same_heads_and_loss(imported_run, probed_imported_run, tmp_path):
    from phaselens.posthoc.runner import run_probes

    original = tmp_path / "original"
    shutil.copytree(probed_imported_run, original)
    assert run_probes(original, probes=["loss"], progress=False).ok
    export(original, tmp_path / "series")
    probe_text = imported_run.parent / "probe.txt"  # the text the series was imported with (tests/conftest.py)
    back = import_back(tmp_path / "series", tmp_path / "back", "--text", str(probe_text), "--seq-len", "32", "--sequences", "8")
    assert open_run(back).checkpoint_steps() == open_run(original).checkpoint_steps()
    assert run_probes(back, probes=["heads", "loss"], progress=False).ok
    for probe in ("heads", "loss"):
        assert_same_values(open_run(original).metrics(probe=probe), open_run(back).metrics(probe=probe))


def test_a_phaselens_transformer_run_exports_as_gpt2_with_the_same_heads_and_loss(induction_run, tmp_path):
    from phaselens.probes.base import make_probe
    from phaselens.probes.measure import measure_model

    result = export(induction_run, tmp_path / "series")
    assert "GPT2LMHeadModel" in result.output
    card = (tmp_path / "series" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["phaselens"]["task"] == "induction" and front["phaselens"]["config"] == open_run(induction_run).config
    assert front["phaselens"]["version"] and "## Transitions" in card and "## Developmental stages" in card
    assert json.loads((tmp_path / "series" / "step20" / "config.json").read_text())["model_type"] == "gpt2"

    back = open_run(import_back(tmp_path / "series", tmp_path / "back", "--text", str(tmp_path / "series" / "probe_text.txt"),
                                "--seq-len", "32", "--sequences", "8"))
    run = open_run(induction_run)
    assert back.checkpoint_steps() == run.checkpoint_steps() == [0, 10, 20]
    batch = run.probe_batch()  # both models measured on the run's own probe batch
    for step in run.checkpoint_steps():
        ours = measure_model(run.load_model(step), batch, [make_probe("heads"), make_probe("loss")])
        theirs = measure_model(back.load_model(step), batch, [make_probe("heads"), make_probe("loss")])
        for (name, values), (_, exported) in zip(ours, theirs):
            assert [m.metric for m in values] == [m.metric for m in exported], name
            for m, e in zip(values, exported):
                assert (m.value - e.value).abs().max() <= TOLERANCE, (step, name, m.metric)


def _with_model(run_copy, model):
    record = json.loads((run_copy / "run.json").read_text())
    record["config"]["model"] = model
    (run_copy / "run.json").write_text(json.dumps(record))
    return run_copy


@pytest.mark.parametrize("model, reason", [({"kind": "bdh"}, "no Hugging Face architecture"),
                                           ({"kind": "transformer", "normalization": "none"}, "normalization='none'")])
def test_models_without_an_exact_hugging_face_form_are_refused_with_the_reason(run_copy, tmp_path, model, reason):
    result = CliRunner().invoke(app, ["export", str(_with_model(run_copy, model)), "--format", "hf-series",
                                      "--out", str(tmp_path / "series")])
    assert result.exit_code != 0 and reason in result.output and "Traceback" not in result.output
    assert not (tmp_path / "series").exists()


def test_a_directory_holding_other_files_is_refused(induction_run, tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(induction_run), "--format", "hf-series", "--out", str(tmp_path / "series")])
    assert result.exit_code != 0 and "is not empty" in result.output
    assert (tmp_path / "series" / "notes.txt").read_text() == "mine"


def test_the_byte_tokenizer_of_a_text_model_maps_each_utf8_byte_to_its_id():
    from phaselens.export.hf_series import id_tokenizer

    text = "To be, or not — é\n"
    tokenizer = id_tokenizer(256, "bytes")
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    assert id_tokenizer(64, "ids")("12 7 31")["input_ids"] == [12, 7, 31]


def test_an_export_refused_part_way_leaves_no_half_series(induction_run, tmp_path, monkeypatch):
    """A checkpoint that cannot be saved (here the last) stops the export: the revisions written before it are
    removed, so `--out` is free for the next try and `import-hf` never reads a series without its card."""
    from phaselens.errors import ConfigError
    from phaselens.export import hf_series

    real = hf_series._GPT2Writer.save

    def save(self, step, folder):
        if step == 20:
            raise ConfigError("refused at step 20")
        return real(self, step, folder)

    monkeypatch.setattr(hf_series._GPT2Writer, "save", save)
    result = CliRunner().invoke(app, ["export", str(induction_run), "--format", "hf-series", "--out", str(tmp_path / "series")])
    assert result.exit_code != 0 and "refused at step 20" in result.output
    assert not (tmp_path / "series").exists()
    monkeypatch.setattr(hf_series._GPT2Writer, "save", real)
    assert export(induction_run, tmp_path / "series").exit_code == 0  # the next try writes the whole series
    assert sorted(p.name for p in (tmp_path / "series").iterdir() if p.is_dir()) == ["step0", "step10", "step20"]
