"""metrics.sqlite: WAL mode, one row per key, background writes, readers beside a writer, export."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from phaselens.cli import app
from phaselens.run import open_run
from phaselens.store.metrics import COLUMNS, MetricsStore, MetricsWriter

CONTRACT_COLUMNS = ["step", "probe", "metric", "layer", "head", "value", "source"]


@pytest.fixture
def store(tmp_path):
    store = MetricsStore(tmp_path / "metrics.sqlite")
    yield store
    store.close()


def count_rows(path) -> int:
    """Rows as a second, independent connection sees them."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    finally:
        conn.close()


def test_store_uses_write_ahead_logging(store):
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_columns_are_the_contract_columns():
    assert COLUMNS == CONTRACT_COLUMNS


def test_writing_the_same_key_twice_keeps_one_row_with_the_last_value(store):
    store.write([(5, "attention", "entropy", 1, 0, 0.5, "live")])
    store.write([(5, "attention", "entropy", 1, 0, 0.7, "live")])
    frame = store.read(probe="attention")
    assert frame.values.tolist() == [[5, "attention", "entropy", 1, 0, 0.7, "live"]]


def test_per_model_values_with_null_layer_and_head_are_also_kept_once(store):
    store.write([(5, "loss", "train", None, None, 2.0, "live")])
    store.write([(5, "loss", "train", None, None, 1.5, "live")])
    store.write([(5, "attention", "specialization", 0, None, 0.1, "live")])
    store.write([(5, "attention", "specialization", 0, None, 0.2, "live")])
    frame = store.read()
    assert len(frame) == 2
    assert frame.set_index("probe").value.to_dict() == {"loss": 1.5, "attention": 0.2}
    assert frame["head"].isna().all()


def test_the_same_key_from_live_and_checkpoint_sources_are_two_rows(store):
    store.write([(10, "attention", "entropy", 0, 0, 1.0, "live"), (10, "attention", "entropy", 0, 0, 1.0, "checkpoint")])
    assert sorted(store.read().source) == ["checkpoint", "live"]


def test_delete_from_step_drops_later_rows_of_that_source_only(store):
    store.write([(step, "loss", "train", None, None, float(step), "live") for step in range(10)])
    store.write([(step, "loss", "train", None, None, float(step), "checkpoint") for step in (0, 5, 9)])
    assert store.delete_from_step(5, source="live") == 5
    live = store.read(source="live")
    assert live.step.tolist() == [0, 1, 2, 3, 4]
    assert store.read(source="checkpoint").step.tolist() == [0, 5, 9]


def test_writer_writes_in_the_background_and_flush_makes_rows_visible(tmp_path):
    path = tmp_path / "metrics.sqlite"
    writer = MetricsWriter(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: a write on the caller's thread would wait here
    try:
        started = time.perf_counter()
        writer.write([(step, "loss", "train", None, None, 1.0, "live") for step in range(100)])
        assert time.perf_counter() - started < 0.5, "write() must queue the rows, not wait for the disk"
        assert any(t.name == "phaselens-metrics-writer" and t.is_alive() for t in threading.enumerate())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    writer.flush()
    assert count_rows(path) == 100
    writer.close()


def test_flush_reports_a_write_error_from_the_background_thread(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.sqlite")
    writer.write([(1, "loss", "train", None, None)])  # too few columns for the table
    with pytest.raises(RuntimeError, match="metrics.sqlite"):
        writer.flush()


def test_close_after_a_write_error_still_stops_the_writer_thread(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.sqlite")
    writer.write([(1, "loss", "train", None, None)])  # too few columns for the table
    with pytest.raises(RuntimeError):
        writer.close()
    writer._worker.thread.join(timeout=1)
    assert not writer._worker.thread.is_alive()


def test_reader_sees_committed_rows_while_a_writer_holds_uncommitted_ones(store):
    store.write([(step, "loss", "train", None, None, 1.0, "live") for step in range(3)])
    writer = sqlite3.connect(store.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO metrics VALUES (3, 'loss', 'train', NULL, NULL, 1.0, 'live')")
    try:
        reader = MetricsStore(store.path)
        started = time.perf_counter()
        assert reader.read().step.tolist() == [0, 1, 2]  # no wait on the writer's lock, no half-written data
        assert time.perf_counter() - started < 1.0
        writer.execute("COMMIT")
        assert reader.read().step.tolist() == [0, 1, 2, 3]
        reader.close()
    finally:
        writer.close()


# ---------------------------------------------------------------------------- through a run


def test_run_metrics_return_the_contract_columns_in_order(induction_run):
    frame = open_run(induction_run).metrics(probe="attention", metric="entropy")
    assert list(frame.columns) == CONTRACT_COLUMNS
    assert set(frame.probe) == {"attention"} and set(frame.metric) == {"entropy"}
    assert str(frame.layer.dtype) == "Int64" and str(frame["head"].dtype) == "Int64"
    live = frame[frame.source == "live"]
    # telemetry.every=5 over 20 steps; one value per layer and head (2 x 2) at each measured step
    assert {0, 5, 10, 15} <= set(live.step) and all(step % 5 == 0 for step in live.step)
    assert (live.groupby("step").size() == 4).all()
    assert not frame.duplicated(["step", "layer", "head", "source"]).any()


def test_run_metrics_leave_layer_and_head_empty_for_per_model_values(induction_run):
    frame = open_run(induction_run).metrics(probe="loss", metric="train")
    assert len(frame) > 0
    assert frame.layer.isna().all() and frame["head"].isna().all()


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_export_writes_every_metric_row(run_copy, fmt):
    expected = open_run(run_copy).metrics()
    result = CliRunner().invoke(app, ["export", str(run_copy), "--format", fmt])
    assert result.exit_code == 0, result.output
    out = run_copy / f"metrics.{fmt}"
    if fmt == "csv":
        frame = pd.read_csv(out)
    elif fmt == "json":
        records = json.loads(out.read_text())
        assert set(records[0]) == set(CONTRACT_COLUMNS)
        frame = pd.DataFrame(records)
    else:
        frame = pd.read_parquet(out)
    assert len(frame) == len(expected) > 0
    assert list(frame.columns) == CONTRACT_COLUMNS
    assert frame.value.sum() == pytest.approx(expected.value.sum())


def test_export_of_a_directory_that_is_not_a_run_fails_with_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 2
    assert "run.json" in result.output and str(tmp_path) in result.output
    assert "Traceback" not in result.output


def test_atomically_written_files_get_the_usual_mode_not_a_private_one(tmp_path):
    from phaselens.store.atomic import UMASK, write_json

    write_json(tmp_path / "run.json", {"a": 1})
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o666 & ~UMASK
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1}
