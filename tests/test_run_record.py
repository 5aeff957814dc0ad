"""run.json is one typed record (`phaselens.store.run_record`): one writer, one reader, older files still read,
keys it does not know kept, and `Run.task` / `Run.study` / `Run.spec` read from it instead of from dicts."""

from __future__ import annotations

import json

import pytest

import phaselens as pl
from phaselens.errors import RunError
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import (ImportedSeries, RunRecord, TrainerOrigin, read_run_record, timestamp, versions,
                                        write_run_record)
from phaselens.tasks.config import task_study
from phaselens.training.config import load_config


def _config(preset: str = "induction") -> dict:
    return load_config(preset, []).to_dict()


def _record(**fields) -> RunRecord:
    config = _config()
    return RunRecord(name="r", status="running", config=config, versions=versions(), device="cpu", steps_done=0,
                     created=timestamp(), **fields)


def test_a_record_written_reads_back_equal(tmp_path):
    record = _record(imported=ImportedSeries(source="toy", local=True, revisions={0: "step0", 100: "step100"},
                                             weights_sha256={0: "ab", 100: "ab"},
                                             identical=[{"steps": [0, 100], "same_as": 100}]),
                     trainer=TrainerOrigin(output_dir="/out", args={"seed": 1}),
                     posthoc_probe_options={"logit_lens": {"first_token_only": True}})
    path = write_run_record(tmp_path / "run.json", record)
    assert read_run_record(path) == record
    on_disk = json.loads(path.read_text())
    assert on_disk["imported"]["revisions"] == {"0": "step0", "100": "step100"}  # JSON keys are strings
    assert on_disk["model"] == on_disk["config"]["model"] and on_disk["task"]["name"] == "induction"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # written atomically: no temporary file left


def test_an_older_run_json_reads_with_the_defaults_of_every_missing_field(tmp_path):
    config = _config()
    (tmp_path / "run.json").write_text(json.dumps({"status": "finished", "config": config}))
    record = RunDir(tmp_path).record()
    assert record.name is None and record.versions == {} and record.steps_done is None and record.imported is None
    assert record.model == config["model"] and record.task == {"name": "induction", **config["data"]}
    assert record.posthoc_probe_options == {} and record.extra == {}
    run = pl.open_run(tmp_path)
    assert run.name == tmp_path.name and run.status == "finished" and not run.imported


def test_keys_the_record_does_not_know_survive_every_update(tmp_path):
    data = _record().to_json()
    data["written_by_a_plugin"] = {"anything": [1, 2]}
    (tmp_path / "run.json").write_text(json.dumps(data))
    run_dir = RunDir(tmp_path)
    assert run_dir.record().extra == {"written_by_a_plugin": {"anything": [1, 2]}}
    run_dir.update(status="finished", steps_done=20)
    after = json.loads((tmp_path / "run.json").read_text())
    assert after["written_by_a_plugin"] == {"anything": [1, 2]}
    assert after["status"] == "finished" and after["steps_done"] == 20


def test_an_update_of_a_field_the_record_does_not_have_is_refused_by_name(tmp_path):
    RunDir(tmp_path).write(_record())
    with pytest.raises(RunError, match="'stauts'"):
        RunDir(tmp_path).update(stauts="finished")
    assert RunDir(tmp_path).record().status == "running"


def test_the_writer_refuses_a_status_phaselens_does_not_write_but_the_reader_reads_it(tmp_path):
    with pytest.raises(RunError, match="status must be one of running, finished, failed, stopped"):
        write_run_record(tmp_path / "run.json", _record().replace(status="done"))
    data = _record().to_json() | {"status": "queued"}  # a newer phaselens may add one
    (tmp_path / "run.json").write_text(json.dumps(data))
    assert RunDir(tmp_path).record().status == "queued"
    assert "status is 'queued'" in RunDir(tmp_path).removal_problem()  # and is never deleted on that ground


@pytest.mark.parametrize("field, value, message", [
    ("steps_done", "20", "'steps_done' must be an integer"),
    ("versions", [1], "'versions' must be a mapping"),
    ("imported", {"local": True}, "malformed 'imported' section"),
    ("trainer", {"args": {}}, "'trainer.output_dir' must be a string"),
])
def test_a_malformed_field_is_refused_naming_the_file_and_the_field(tmp_path, field, value, message):
    (tmp_path / "run.json").write_text(json.dumps(_record().to_json() | {field: value}))
    with pytest.raises(RunError, match=message) as caught:
        RunDir(tmp_path).record()
    assert str(tmp_path / "run.json") in str(caught.value)


def test_an_imported_series_updated_with_a_dict_is_kept_typed(tmp_path):
    RunDir(tmp_path).write(_record(imported=ImportedSeries(source="toy", revisions={0: "a", 10: "b"})))
    RunDir(tmp_path).update(imported={"source": "toy", "revisions": {"0": "a", "10": "b"},
                                      "identical": [{"steps": [0, 10], "same_as": 10}]})
    run = pl.open_run(tmp_path)
    assert run.imported and run.record.imported.revisions == {0: "a", 10: "b"}
    assert run.identical_steps() == {0: 10}


@pytest.mark.parametrize("preset, task, kind", [("induction", "induction", "transformer"),
                                                ("disamb_small", "bz_to_a", "transformer")])
def test_run_task_study_and_spec_are_typed_reads_of_the_record(tmp_path, preset, task, kind):
    RunDir(tmp_path).write(RunRecord(name="r", status="finished", config=_config(preset)))
    run = pl.open_run(tmp_path)
    assert run.task == task and run.study == task_study(task)
    assert run.spec.kind == kind and run.spec.n_layers == run.config["model"]["n_layers"]


def test_a_config_without_data_task_is_the_default_task_the_config_loader_reads(tmp_path):
    config = _config()
    del config["data"]["task"]
    RunDir(tmp_path).write(RunRecord(name="r", status="finished", config=config))
    assert pl.open_run(tmp_path).task == load_config("induction", []).data.task == "induction"
