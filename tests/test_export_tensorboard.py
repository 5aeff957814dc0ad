"""TensorBoard: `phaselens export --format tensorboard` and the live mirror, read back with TensorBoard's own reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from phaselens.cli import app
from phaselens.run import open_run
from phaselens.store.tensorboard import scalar_tag

pytest.importorskip("tensorboard")


def read_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """Every scalar under one TensorBoard run folder, by (tag, step), as TensorBoard itself reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every value, no sampling
    events.Reload()
    values = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in values, f"{tag} at step {event.step} written twice"
            values[(tag, event.step)] = event.value
    return values


def expected_scalars(run_path: Path, source: str) -> dict[tuple[str, int], float]:
    """The run's rows of `source` that have a value, by their TensorBoard (tag, step)."""
    frame = open_run(run_path).metrics(source=source)
    frame = frame[frame["value"].notna()]
    def index(value):
        return None if pd.isna(value) else int(value)

    return {(scalar_tag(r.probe, r.metric, index(r.layer), index(r.head)), int(r.step)): float(r.value) for r in frame.itertuples()}


def assert_round_trip(run_path: Path, logdir: Path) -> int:
    """Every value of every source reads back from the event files (as float32, TensorBoard's scalar type), and nothing else."""
    total = 0
    for source in ("live", "checkpoint"):
        expected = expected_scalars(run_path, source)
        read = read_scalars(logdir / source)
        assert read.keys() == expected.keys(), (source, sorted(set(read) ^ set(expected))[:5])
        for key, value in expected.items():
            assert read[key] == float(np.float32(value)) or (math.isnan(value) and math.isnan(read[key])), key
        total += len(expected)
    return total


def test_scalar_tags_name_probe_metric_layer_and_head():
    assert scalar_tag("loss", "train", None, None) == "loss/train"
    assert scalar_tag("attention", "entropy", 1, None) == "attention/entropy/L1"
    assert scalar_tag("heads", "induction", 1, 3) == "heads/induction/L1H3"


def test_export_writes_every_series_and_tensorboard_reads_every_value_back(induction_run, tmp_path):
    out = tmp_path / "tb"
    result = CliRunner().invoke(app, ["export", str(induction_run), "--format", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    total = assert_round_trip(induction_run, out)
    assert f"wrote {total} scalars" in result.output
    tags = {tag for tag, _ in read_scalars(out / "live")}
    assert any(tag.startswith("heads/") and tag.endswith("H0") for tag in tags)  # per-head series: .../L{l}H{h}
    assert "loss/train" in tags  # per-model series: probe/metric


def test_a_second_export_into_the_same_directory_is_refused(induction_run, tmp_path):
    out = tmp_path / "tb"
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(induction_run), "--format", "tensorboard", "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["export", str(induction_run), "--format", "tensorboard", "--out", str(out)])
    assert again.exit_code != 0 and "already holds TensorBoard event files" in again.output
    assert "Traceback" not in again.output


def test_live_mirror_writes_the_values_training_stores(tmp_path):
    """`telemetry.tensorboard=DIR` mirrors every live and checkpoint value while the run trains."""
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    logdir = tmp_path / "live-tb"
    config = load_config("induction", ["train.steps=10", "train.checkpoint_every=5", "telemetry.every=2",
                                       f"telemetry.tensorboard={logdir}"])
    train(config, tmp_path / "run", progress=False)
    assert assert_round_trip(tmp_path / "run", logdir) > 0


def test_a_log_directory_that_is_a_file_is_refused_before_training(tmp_path):
    from phaselens.errors import ConfigError
    from phaselens.training.config import load_config

    (tmp_path / "tb").write_text("not a directory")
    with pytest.raises(ConfigError, match="telemetry.tensorboard"):
        load_config("induction", [f"telemetry.tensorboard={tmp_path / 'tb'}"]).validate()


def test_without_the_tensorboard_package_the_export_says_what_to_install(induction_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)  # import now fails
    result = CliRunner().invoke(app, ["export", str(induction_run), "--format", "tensorboard", "--out", str(tmp_path / "tb")])
    assert result.exit_code != 0 and "pip install 'phaselens[tensorboard]'" in result.output
    assert "Traceback" not in result.output
