"""The command line on bad input and faults, as a new user meets them: every case ends in a clear
message naming the problem, never a Python traceback, and phaselens never deletes a file it did
not write. Each test is one case that once failed; the corpus only grows."""

from __future__ import annotations

import json
import time
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


# ---------------------------------------------------------------------------- issue 27: data loss, links out of the run, two writers

def interrupted_before_its_first_checkpoint(out: Path, *overrides: str) -> None:
    """What `phaselens train` leaves when Ctrl-C hits while its first checkpoint is written: a run to start over."""
    import phaselens.training.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    saved = trainer.save_checkpoint
    trainer.save_checkpoint = interrupted
    try:
        assert run_cli("train", *TINY_ARGS, *overrides, "--out", out).exit_code == 130
    finally:
        trainer.save_checkpoint = saved
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def users_files(run: Path, *places: str) -> list[Path]:
    files = []
    for place in places:
        (run / place).parent.mkdir(parents=True, exist_ok=True)
        (run / place).write_text(f"the user's {place}")
        files.append(run / place)
    return files


def survived(files: list[Path], run: Path) -> bool:
    return all(f.read_text() == f"the user's {f.relative_to(run)}" for f in files)


IN_RUN_FOLDERS = ["report/my_figure.png", "artifacts/notes.txt", "artifacts/heads/mine.json", "samples/my_sample.safetensors",
                  "checkpoints/step_00000010/notes.txt"]


@pytest.mark.parametrize("place", IN_RUN_FOLDERS)
def test_demo_never_deletes_the_users_files_inside_the_folders_of_a_run_it_replaces(run_copy, place):
    files = users_files(run_copy, place)
    refused("demo", "--out", run_copy, "--steps", "20", says=place)
    assert survived(files, run_copy) and (run_copy / "run.json").is_file()


def test_report_replaces_only_the_figures_it_drew(run_copy):
    from phaselens.store.run_dir import RunDir

    files = users_files(run_copy, "report/my_figure.png")
    assert run_cli("report", run_copy).exit_code == 0
    assert survived(files, run_copy)
    drawn = RunDir(run_copy).report_figures()
    assert drawn and all((run_copy / "report" / name).is_file() for name in drawn) and "my_figure.png" not in drawn
    RunDir(run_copy).record_report_figures([*drawn, "dropped.png"])  # a figure an older report drew and this one cannot
    (run_copy / "report" / "dropped.png").write_bytes(b"old figure")
    assert run_cli("report", run_copy).exit_code == 0
    assert survived(files, run_copy) and not (run_copy / "report" / "dropped.png").exists()
    assert sorted(RunDir(run_copy).report_figures()) == sorted(drawn)  # the user's figure is never taken for one of ours


def test_a_sweep_point_that_never_checkpointed_keeps_the_users_files(tmp_path):
    point = tmp_path / "d" / "run"  # the one point of a sweep without axes
    interrupted_before_its_first_checkpoint(point, "name=run")
    files = users_files(point, "report/my_figure.png", "artifacts/notes.txt", "samples/mine.txt")
    result = run_cli("sweep", "induction", *TINY, "--out", tmp_path / "d")
    assert result.exit_code == 1 and "failed" in result.output and "report/my_figure.png" in result.output
    assert survived(files, point)


def test_train_starting_over_a_run_without_checkpoints_keeps_the_users_files(tmp_path):
    out = tmp_path / "run"
    interrupted_before_its_first_checkpoint(out)
    files = users_files(out, "report/my_figure.png", "artifacts/notes.txt")
    refused("train", *TINY_ARGS, "--out", out, says="artifacts/notes.txt")
    assert survived(files, out)
    for f in files:
        f.unlink()
    assert run_cli("train", *TINY_ARGS, "--out", out).exit_code == 0  # with them moved out, it starts over


def link_a_checkpoint_from_outside(run: Path, elsewhere: Path) -> None:
    """checkpoints/step_00000030: a link to another run's checkpoint, outside `run`."""
    import shutil

    shutil.copytree(run / "checkpoints" / "step_00000020", elsewhere / "step_00000020")
    (run / "checkpoints" / "step_00000030").symlink_to(elsewhere / "step_00000020", target_is_directory=True)


def test_probe_refuses_a_checkpoint_that_links_outside_the_run(run_copy, tmp_path):
    link_a_checkpoint_from_outside(run_copy, tmp_path / "elsewhere")
    refused("probe", run_copy, "--probes", "heads", says="checkpoints/step_00000030 resolves to")
    (run_copy / "checkpoints" / "step_00000030").unlink()
    weights = run_copy / "checkpoints" / "step_00000010" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(tmp_path / "elsewhere" / "step_00000020" / "model.safetensors")
    result = refused("probe", run_copy, "--probes", "heads", says="outside the run")
    assert "step_00000010/model.safetensors" in result.stderr


def test_a_second_writer_on_a_run_is_refused_naming_the_holders_pid(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "phaselens.cli", "train", "induction", "train.steps=100000",
                              "train.checkpoint_every=5", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step_00000005").is_dir():  # training: the first process holds the run
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first writer never checkpointed"
            time.sleep(0.2)
        for second in (["train", "induction", "train.steps=100000", "train.checkpoint_every=5", "--out", out],
                       ["train", "induction", "train.steps=100000", "train.checkpoint_every=5", "--out", out, "--resume"],
                       ["probe", out, "--probes", "heads"]):
            result = refused(*second, says=f"pid {first.pid}")
            assert "is in use" in result.stderr and str(out) in result.stderr
        assert first.poll() is None  # the first writer went on undisturbed
    finally:
        first.kill()
        first.wait()
    assert run_cli("probe", out, "--probes", "heads").exit_code == 0  # the lock goes with its holder, even a killed one


def test_import_hf_refuses_a_non_empty_directory_that_is_not_a_run(tmp_path):
    series = tmp_path / "series" / "step0"
    series.mkdir(parents=True)
    (series / "config.json").write_text("{}")
    out = tmp_path / "mine"
    files = users_files(out, "notes.txt")
    refused("import-hf", tmp_path / "series", "--revisions", "step0", "--out", out, says="not empty")
    assert survived(files, out) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_serve_on_port_0_binds_a_free_port_and_prints_it(induction_run):
    import re
    import subprocess
    import sys
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "phaselens.cli", "serve", str(induction_run), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import threading

    watchdog = threading.Timer(120, server.kill)  # a server that never announces must not hang the test
    watchdog.start()
    try:
        line = server.stdout.readline()  # the announcement comes once the port is bound
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        assert port != 0, line
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5) as response:
                    assert induction_run.name in response.read().decode()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server never answered on the port it printed"
                time.sleep(0.2)
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(timeout=30)


def test_serve_on_a_port_in_use_says_so(induction_run):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        refused("serve", induction_run, "--port", taken.getsockname()[1], says="choose another --port")
    finally:
        taken.close()


def phaselens_within(seconds: float, *args: str):
    """`phaselens ARGS` in a process of its own that must end within `seconds` (a hang fails the test)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "phaselens.cli", *map(str, args)], capture_output=True, text=True, timeout=seconds)


def test_a_fifo_as_trainer_json_is_refused_not_read_forever(run_copy):
    import os

    killed_after_step_10(run_copy)
    fifo = run_copy / "checkpoints" / "step_00000010" / "trainer.json"
    fifo.unlink()
    os.mkfifo(fifo)
    result = phaselens_within(120, "train", *FIXTURE_ARGS, "--out", run_copy, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trainer.json is missing or not a regular file" in result.stdout  # step 10 skipped, resumed from step 0
    assert "Traceback" not in result.stderr


def test_a_fifo_as_the_probe_batch_is_refused_not_read_forever(run_copy):
    import os

    (run_copy / "probe_batch.safetensors").unlink()
    os.mkfifo(run_copy / "probe_batch.safetensors")
    result = phaselens_within(120, "probe", run_copy, "--probes", "heads", "--remeasure")
    assert result.returncode != 0 and "probe_batch.safetensors is not a regular file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- issue 27: settings refused up front

@pytest.mark.parametrize("setting, says", [
    (f"name={'a' * 300}", "at most 255 bytes"),
    ("train.seed=99999999999999999999", "train.seed must be between 0 and"),
    ("train.device=cuda:abc", "train.device must be one of auto|cpu|cuda|cuda:N|mps"),
    ("train.threads=100000", "train.threads must be between 0"),
    ("model.d_vocab=1", "model.d_vocab=1: the induction task draws random tokens and needs at least 2"),
    ("model.init_std=.inf", "model.init_std must be a finite number > 0"),
    ("telemetry.probe_options.heads.bogus=1", "unknown option(s) ['bogus']; its options: none"),
    ("telemetry.probe_options.attention.bogus=1", "unknown option(s) ['bogus']; its options: none"),
    ("telemetry.probe_options.neurons.bogus=1", "unknown option(s) ['bogus']; its options: hook, threshold"),
    ("telemetry.probe_options.logit_lens.first_token_only=maybe", "first_token_only='maybe' must be true or false"),
    ("telemetry.probe_options.llc.gamma=.nan", "gamma must be a finite number"),
    ("telemetry.probe_options.logit_lens.positions=[copy,source]", "positions=['copy', 'source'] must be a name"),
])
def test_an_impossible_setting_is_refused_by_name_before_anything_is_written(setting, says, tmp_path):
    refused("train", *TINY_ARGS, setting, "--out", tmp_path / "r", says=says)
    assert not (tmp_path / "r").exists()


def test_mps_on_a_machine_without_it_is_refused_naming_the_key(tmp_path):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    refused("train", *TINY_ARGS, "train.device=mps", "--out", tmp_path / "r", says="train.device=mps: no MPS")


def test_an_option_no_probe_has_is_refused_for_every_probe_on_the_command_line(induction_run):
    from phaselens.probes.base import probe_names

    for name in probe_names():  # one check, in the measurement plan, for every probe (built-in or a plug-in)
        result = refused("probe", induction_run, "--probes", name, "--probe-option", f"{name}.no_such_option=1",
                         says="unknown option(s) ['no_such_option']")
        assert f"probe {name!r}" in result.stderr


def test_import_hf_refuses_an_object_of_counts_a_step_beyond_the_store_and_a_series_without_its_tokenizer(tiny_hf_models, tmp_path):
    import shutil

    series = tmp_path / "series"
    for revision in ("step0", "step99999999999999999999"):
        shutil.copytree(tiny_hf_models["gpt2"], series / revision)
    (tmp_path / "text.txt").write_text("the cat sat on the mat while the dog ran far away from the old red barn\n" * 20)
    (tmp_path / "counts.json").write_text(json.dumps({"the": 3, "cat": 1}))
    common = ["--text", tmp_path / "text.txt", "--seq-len", "16", "--sequences", "2"]
    refused("import-hf", series, "--revisions", "step0", "--out", tmp_path / "a", "--unigram", tmp_path / "counts.json", *common,
            says="--unigram: ")
    refused("import-hf", series, "--revisions", "step0,step99999999999999999999", "--out", tmp_path / "b", *common,
            says="its step is beyond the largest phaselens stores")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (series / "step0" / name).unlink()
    refused("import-hf", series, "--revisions", "step0", "--out", tmp_path / "c", *common, says="step0 has no tokenizer files")
    assert not any((tmp_path / out).exists() for out in "abc")  # nothing half-made is left


# ---------------------------------------------------------------------------- issue 27: signals, locks, NaN weights

# `phaselens ARGV` in which the SIGTERM a scheduler sends arrives while step 10's checkpoint is being written:
# between its model file and its trainer files.
SIGTERM_DURING_A_CHECKPOINT = """
import os, signal, sys
import phaselens.models.checkpoints as checkpoints
real = checkpoints.save_file
def save_file(tensors, path, *args, **kwargs):
    real(tensors, path, *args, **kwargs)
    if "step_00000010" in path and path.endswith("model.safetensors"):
        os.kill(os.getpid(), signal.SIGTERM)
checkpoints.save_file = save_file
from phaselens.cli import app
app(sys.argv[1:], prog_name="phaselens")
"""


def test_sigterm_during_a_checkpoint_write_finishes_it_and_stops_the_run_as_ctrl_c_does(tmp_path):
    import subprocess
    import sys

    from phaselens.store.run_dir import RunDir

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", SIGTERM_DURING_A_CHECKPOINT, "train", *FIXTURE_ARGS, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "stopped by SIGTERM at step 10: checkpoint and metrics up to it are saved" in result.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "stopped" and info["steps_done"] == 10 and "SIGTERM" in info["stop_reason"]
    assert RunDir(out).checkpoint_steps() == [0, 10] and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000000", "step_00000010"]  # the checkpoint being written was finished; no temp dir is left
    assert run_cli("train", *FIXTURE_ARGS, "--out", out, "--resume").exit_code == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (an exited one waiting to be reaped, a zombie, does not)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state and "\nState:\tX" not in state


def test_sigterm_to_probe_with_workers_ends_the_workers_and_the_python_api_takes_the_same_lock(run_copy):
    import signal
    import subprocess
    import sys

    from phaselens.errors import RunError
    from phaselens.posthoc.runner import run_probes

    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to find the worker processes")
    driver = subprocess.Popen([sys.executable, "-m", "phaselens.cli", "probe", str(run_copy), "--probes", "llc", "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:  # the sweep is under way: both workers measure a checkpoint
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read() if driver.poll() is not None else "no workers"
            children = Path(f"/proc/{driver.pid}/task/{driver.pid}/children")
            workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
            time.sleep(0.1)
        with pytest.raises(RunError, match=f"is in use: pid {driver.pid} \\(probe\\)"):  # a second writer, through Python
            run_probes(run_copy, ["attention"], progress=False)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 143
        stderr = driver.stderr.read()
        assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr, stderr
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {[p for p in workers if _alive(p)]} outlived their driver"
            time.sleep(0.1)
    finally:
        driver.kill()
        driver.wait()
        for pid in workers:
            if _alive(pid):
                import os

                os.kill(pid, signal.SIGKILL)
    assert run_probes(run_copy, ["attention"], progress=False).ok  # the lock went with its holder


def test_a_metrics_store_locked_by_another_process_is_named_after_a_bounded_wait(run_copy, monkeypatch):
    import subprocess
    import sys

    import phaselens.store.metrics as metrics

    monkeypatch.setattr(metrics, "LOCK_WAIT", 1.0)
    killed_after_step_10(run_copy)
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                               "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(120)", str(run_copy / "metrics.sqlite")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        began = time.monotonic()
        refused("probe", run_copy, "--probes", "logit_lens", "--steps", "0", says="metrics.sqlite is locked by another process")
        result = refused("train", *FIXTURE_ARGS, "--out", run_copy, "--resume", says="metrics.sqlite is locked by another process")
        assert time.monotonic() - began < 60 and "damaged" not in result.stderr
        info = json.loads((run_copy / "run.json").read_text())
        assert info["status"] != "running" and "locked" in info["stop_reason"]
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("train", *FIXTURE_ARGS, "--out", run_copy, "--resume").exit_code == 0  # resumable once the lock is gone


def nan_weights(checkpoint: Path) -> None:
    """Overwrite a checkpoint's weights with NaN, keeping every name and shape (a diverged run saved, or bad memory)."""
    import torch
    from safetensors.torch import load_file, save_file

    file = checkpoint / "model.safetensors"
    save_file({name: torch.full_like(t, float("nan")) for name, t in load_file(str(file)).items()}, str(file))


def test_a_checkpoint_of_nan_weights_is_flagged_failed_with_the_reason_not_measured(run_copy):
    import phaselens as pl

    nan_weights(run_copy / "checkpoints" / "step_00000010")
    result = run_cli("probe", run_copy, "--probes", "logit_lens")
    assert result.exit_code == 1 and "step 10:" in result.stderr and "NaN or infinite weights" in result.stderr
    lens = pl.open_run(run_copy).metrics(probe="logit_lens", source="checkpoint")
    assert set(lens["step"]) == {0, 20}  # no row of NaN-weight values


# ---------------------------------------------------------------------------- issue 27: read-only runs and full disks

# Mounts a user may make in a namespace of their own (no real root needed): a read-only bind, a small tmpfs.
# `phaselens` commands run there in one interpreter; the answer is one JSON line per step.
IN_NAMESPACE = """
import json, subprocess, sys
from pathlib import Path
from typer.testing import CliRunner
from phaselens.cli import app
run, answers = Path(sys.argv[1]), []
for step in json.loads(sys.argv[2]):
    if step[0] == "sh":
        subprocess.run(step[1], shell=True, check=True)
        continue
    result = CliRunner().invoke(app, step)
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    temps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) if (run / "checkpoints").is_dir() else []
    answers.append({"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr, "status": info.get("status"),
                    "steps_done": info.get("steps_done"), "temps": temps,
                    "escaped": None if isinstance(result.exception, (SystemExit, type(None))) else repr(result.exception)})
print(json.dumps(answers))
"""


def in_own_namespace(mount: str, run: Path, *steps: list[str]) -> list[dict]:
    """Run `steps` (phaselens argument lists, or ["sh", command]) after the shell command `mount`, in a user and
    mount namespace of their own; skips where the kernel does not lend such namespaces."""
    import shutil
    import subprocess
    import sys

    unshare = ["unshare", "--user", "--map-root-user", "--mount"]
    if shutil.which("unshare") is None or subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs user and mount namespaces (unshare) to mount a read-only or small file system")
    result = subprocess.run([*unshare, "sh", "-c", f'{mount} && exec "$@"', "sh", sys.executable, "-c", IN_NAMESPACE, str(run),
                             json.dumps([[str(a) for a in step] for step in steps])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for answer in answers:
        assert answer["escaped"] is None and "Traceback" not in answer["stderr"], answer
    return answers


@pytest.mark.slow
def test_a_read_only_run_is_exported_and_writers_say_it_is_read_only_not_damaged(run_copy, tmp_path):
    import shlex

    killed_after_step_10(run_copy)
    where = shlex.quote(str(run_copy))
    export, probe, report, resume = in_own_namespace(
        f"mount --bind {where} {where} && mount -o remount,bind,ro {where}", run_copy,
        ["export", run_copy, "--out", tmp_path / "metrics.csv"], ["probe", run_copy, "--probes", "logit_lens"],
        ["report", run_copy], ["train", *FIXTURE_ARGS, "--out", run_copy, "--resume"])
    assert export["exit"] == 0 and len((tmp_path / "metrics.csv").read_text().splitlines()) > 10
    for answer in (probe, report, resume):
        assert answer["exit"] != 0 and f"{run_copy} is read-only" in answer["stderr"], answer
        assert "damaged" not in answer["stderr"]


@pytest.mark.slow
def test_a_full_disk_during_train_resume_and_probe_is_one_line_and_the_run_resumes(tmp_path):
    import shlex

    disk = tmp_path / "disk"
    disk.mkdir()
    run = disk / "run"
    quoted = shlex.quote(str(disk))
    args = ["induction", "train.steps=60", "train.checkpoint_every=5", "telemetry.every=5", "--out", run]
    first, resumed, probe, finished, probed = in_own_namespace(
        f"mount -t tmpfs -o size=3m tmpfs {quoted}", run,  # room for about four checkpoints
        ["train", *args],
        ["sh", f"mount -o remount,size=4m {quoted}"], ["train", *args, "--resume"],
        ["sh", f"dd if=/dev/zero of={quoted}/filler bs=4k 2>/dev/null || true"], ["probe", run, "--probes", "logit_lens"],
        ["sh", f"rm {quoted}/filler && mount -o remount,size=64m {quoted}"], ["train", *args, "--resume"],
        ["probe", run, "--probes", "logit_lens"])
    for answer in (first, resumed):
        assert answer["exit"] != 0 and answer["status"] == "failed" and not answer["temps"], answer
        assert f"the disk holding {run}, {disk} (" in answer["stderr"] and "free space and continue with --resume" in answer["stderr"]
        assert len(answer["stderr"].strip().splitlines()) == 1
    assert 0 < first["steps_done"] < resumed["steps_done"] < 60  # the resume went on from the last checkpoint
    assert probe["exit"] != 0 and "is full" in probe["stderr"] and str(disk) in probe["stderr"], probe
    assert finished["exit"] == 0 and finished["status"] == "finished" and probed["exit"] == 0, (finished, probed)


def test_the_reliability_page_python_block_is_refused_by_a_writer_holding_the_run(run_copy):
    """docs/reference/reliability.md's Python block, run while another process holds the run's writer lock."""
    import contextlib
    import io
    import re
    import subprocess
    import sys

    page = (Path(__file__).parent.parent / "docs" / "reference" / "reliability.md").read_text()
    blocks = re.findall(r"<!-- run by tests/test_cli_bad_input.py -->\n```python\n(.*?)```", page, re.S)
    block = next(b for b in blocks if "another process writes the run" in b)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from phaselens.store.run_dir import RunDir\n"
                               "with RunDir(sys.argv[1]).writer_lock('probe'):\n    print('held', flush=True); time.sleep(120)",
                               str(run_copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(block.replace('"runs/induction"', repr(str(run_copy))), {})
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use: pid {holder.pid} (probe)" in printed.getvalue()
