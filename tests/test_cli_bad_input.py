"""The command line on bad input and faults, as a new user meets them: every case ends in a clear
message naming the problem, never a Python traceback, and phaselens never deletes a file it did
not write. Each test is one case that once failed; the corpus only grows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phaselens.cli import app

TINY = ["train.steps=5", "train.checkpoint_every=5", "telemetry.every=5"]
TINY_ARGS = ["induction", *TINY]


def run_cli(*args: str):
    """Invoke `phaselens ARGS` in-process; an exception escaping the command is what prints a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"phaselens {' '.join(map(str, args))} raised {escaped!r}\n{result.output}"
    assert "Traceback" not in result.stderr
    return result


def refused(*args: str, says: str):
    """`phaselens ARGS` exits non-zero with an error line containing `says`."""
    result = run_cli(*args)
    assert result.exit_code != 0, result.output
    assert says in result.stderr, result.stderr
    return result


# ---------------------------------------------------------------------------- data loss


def test_sweep_never_empties_a_point_directory_holding_the_users_files(tmp_path):
    notes = tmp_path / "d" / "run" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("x")
    result = run_cli("sweep", "induction", *TINY, "--out", tmp_path / "d")
    assert notes.read_text() == "x"
    assert result.exit_code == 1 and "notes.txt" in result.output and "failed" in result.output


def test_demo_refuses_to_replace_a_directory_that_is_not_entirely_a_phaselens_run(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "notes.txt").write_text("x")
    refused("demo", "--out", out, "--steps", "20", says="phaselens deletes only directories it wrote")
    assert (out / "notes.txt").read_text() == "x" and (out / "run.json").read_text() == "{}"


def test_demo_refuses_a_real_run_with_a_foreign_file_in_it(run_copy):
    (run_copy / "notes.txt").write_text("x")
    refused("demo", "--out", run_copy, "--steps", "20", says="notes.txt")
    assert (run_copy / "notes.txt").read_text() == "x" and (run_copy / "run.json").is_file()


def test_train_refuses_a_non_empty_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    refused("train", "induction", *TINY, "--out", tmp_path, says="not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


# ---------------------------------------------------------------------------- interrupted set-up, memory, resume

FIXTURE_ARGS = ["induction", "train.steps=20", "train.checkpoint_every=10", "telemetry.every=5"]  # how `induction_run` was trained


def killed_after_step_10(run: Path) -> None:
    """Make `run` (a copy of `induction_run`) what a run killed between its checkpoints 10 and 20 leaves."""
    import shutil

    from phaselens.store.run_dir import RunDir

    shutil.rmtree(RunDir(run).checkpoint(20))
    RunDir(run).update(status="running", steps_done=10)


def test_impossible_memory_is_refused_up_front_with_the_estimate(tmp_path):
    refused("train", "induction", "model.n_ctx=1000000", "--out", tmp_path / "big", says="needs at least")
    assert not (tmp_path / "big").exists()


def test_an_interrupt_before_the_first_checkpoint_leaves_a_run_that_starts_over(tmp_path, monkeypatch):
    import phaselens.training.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", interrupted)  # Ctrl-C while the first checkpoint is written
        result = run_cli("train", *TINY_ARGS, "--out", out)
    assert result.exit_code == 130 and "nothing was saved" in result.output
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    resumed = run_cli("train", *TINY_ARGS, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_crash_in_set_up_is_recorded_and_the_same_command_starts_the_run_over(tmp_path, monkeypatch):
    import phaselens.training.trainer as trainer

    def crashed(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", crashed)
        with pytest.raises(OSError):
            CliRunner().invoke(app, ["train", *TINY_ARGS, "--out", str(out)], catch_exceptions=False)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "disk full" in info["stop_reason"]
    again = run_cli("train", *TINY_ARGS, "--out", out)
    assert again.exit_code == 0 and "starting it over" in again.output


def test_resume_refuses_when_metrics_sqlite_is_missing_and_continues_only_when_asked(run_copy):
    killed_after_step_10(run_copy)
    (run_copy / "metrics.sqlite").unlink()
    refused("train", *FIXTURE_ARGS, "--out", run_copy, "--resume", says="metrics.sqlite is missing")
    assert not (run_copy / "metrics.sqlite").exists()
    result = run_cli("train", *FIXTURE_ARGS, "--out", run_copy, "--resume", "--new-metrics")
    assert result.exit_code == 0, result.output
    import phaselens as pl

    assert pl.open_run(run_copy).metrics(probe="loss", metric="train")["step"].min() == 10


def damage(store: Path) -> None:
    """Overwrite the middle of a SQLite file, as a failing disk or a bad copy does."""
    data = bytearray(store.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = b"\xff" * 4096
    store.write_bytes(bytes(data))


def test_resume_refuses_a_damaged_metrics_sqlite_and_keeps_it_when_asked_to_go_on(run_copy):
    killed_after_step_10(run_copy)
    damage(run_copy / "metrics.sqlite")
    refused("train", *FIXTURE_ARGS, "--out", run_copy, "--resume", says="metrics.sqlite is damaged")
    result = run_cli("train", *FIXTURE_ARGS, "--out", run_copy, "--resume", "--new-metrics")
    assert result.exit_code == 0, result.output
    assert (run_copy / "metrics.sqlite.damaged").is_file() and "kept the damaged" in result.output


def test_resume_keeps_the_post_hoc_rows_of_the_checkpoint_it_starts_from(run_copy):
    import phaselens as pl

    assert run_cli("probe", run_copy, "--probes", "logit_lens").exit_code == 0
    killed_after_step_10(run_copy)
    assert run_cli("train", *FIXTURE_ARGS, "--out", run_copy, "--resume").exit_code == 0
    lens = pl.open_run(run_copy).metrics(probe="logit_lens", metric="p_correct", source="checkpoint")
    assert {0, 10} <= set(lens["step"])  # step 10's checkpoint did not change: its values stay


# ---------------------------------------------------------------------------- damaged or missing metrics in readers


@pytest.mark.parametrize("command", [["report"], ["export"]])
def test_a_damaged_metrics_sqlite_is_named_not_a_traceback(run_copy, command):
    damage(run_copy / "metrics.sqlite")
    refused(*command, run_copy, says="metrics.sqlite is damaged")


def test_compare_names_a_damaged_metrics_sqlite(tmp_path):
    # a disambiguation run: its task declares the headline (τ) that compare reads from the metrics
    tiny = ["data.k=2", "data.n_unique_b=4", "model.n_layers=1", "model.d_model=32", "model.d_head=8", "train.steps=10",
            "train.warmup=0", "train.checkpoint_every=10", "train.eval_every=5", "telemetry.every=5"]
    assert run_cli("train", "disamb_small", *tiny, "--out", tmp_path / "run").exit_code == 0
    damage(tmp_path / "run" / "metrics.sqlite")
    refused("compare", tmp_path / "run", "--out", tmp_path / "cmp", says="metrics.sqlite is damaged")


def test_readers_never_create_a_missing_metrics_store(run_copy):
    (run_copy / "metrics.sqlite").unlink()
    refused("report", run_copy, says="metrics.sqlite is missing")
    refused("export", run_copy, says="metrics.sqlite is missing")
    assert not (run_copy / "metrics.sqlite").exists()


# ---------------------------------------------------------------------------- clear errors, not tracebacks


def test_train_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    refused("train", *TINY_ARGS, "--out", tmp_path / "f", says="is a file")
    assert (tmp_path / "f").read_text() == "x"


def test_export_names_an_output_it_cannot_write(induction_run, tmp_path):
    (tmp_path / "file").write_text("x")
    refused("export", induction_run, "--out", tmp_path / "missing" / "m.csv", says="does not exist")
    refused("export", induction_run, "--out", tmp_path, says="is a directory")
    refused("export", induction_run, "--out", tmp_path / "file" / "m.csv", says="does not exist")


def test_compare_names_an_output_it_cannot_write(induction_run, tmp_path):
    (tmp_path / "file").write_text("x")
    refused("compare", induction_run, "--out", tmp_path / "file" / "cmp", says="cannot write the comparison")


def test_neurons_on_a_text_file_an_empty_pt_and_an_attention_only_run(induction_run, tmp_path):
    (tmp_path / "notes.txt").write_text("hello world\n")
    refused("neurons", tmp_path / "notes.txt", says="not a readable PyTorch file")
    (tmp_path / "empty.pt").write_bytes(b"")
    refused("neurons", tmp_path / "empty.pt", says="is empty (0 bytes)")
    refused("neurons", induction_run, says="attention-only model has none")


@pytest.mark.parametrize("section", ["model", "data"])
def test_a_run_json_without_its_model_or_data_section_is_refused_not_defaulted(run_copy, section):
    info = json.loads((run_copy / "run.json").read_text())
    del info["config"][section]
    (run_copy / "run.json").write_text(json.dumps(info))
    refused("report", run_copy, says=f"no '{section}' section")
    refused("probe", run_copy, "--probes", "attention", says=f"no '{section}' section")


# ---------------------------------------------------------------------------- validation gaps


@pytest.mark.parametrize("key", ["weight_decay", "grad_clip"])
def test_nan_training_settings_are_refused_by_name(key, tmp_path):
    refused("train", *TINY_ARGS, f"train.{key}=nan", "--out", tmp_path / "r", says=f"train.{key} must be a finite number")


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_a_worker_count_below_one_is_refused(induction_run, workers, tmp_path):
    refused("probe", induction_run, "--workers", workers, says="--workers must be >= 1")
    refused("sweep", "induction", *TINY, "--workers", workers, "--out", tmp_path / "s", says="--workers must be >= 1")


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", ".."])
def test_a_run_name_cannot_escape_the_runs_folder(name, tmp_path, monkeypatch):
    here = tmp_path / "a" / "b"  # runs/../../x would land in tmp_path/a: still inside this test's folder
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    refused("train", *TINY_ARGS, f"name={name}", says="name must be a plain directory name")
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["a", "a/b"]


def test_serve_refuses_an_impossible_port():
    refused("serve", "--port", "99999", says="99999")


def test_a_directory_given_as_a_config_file_is_called_a_directory(tmp_path):
    refused("train", tmp_path, says="is a directory")


def test_import_hf_of_a_missing_directory_says_so(tmp_path):
    refused("import-hf", tmp_path / "no" / "such", "--revisions", "step0", "--out", tmp_path / "r", says="no such directory")


def test_a_resume_with_a_changed_config_names_the_key(run_copy):
    killed_after_step_10(run_copy)
    refused("train", *FIXTURE_ARGS, "train.lr=0.002", "--out", run_copy, "--resume", says="train.lr: 0.001 -> 0.002")
