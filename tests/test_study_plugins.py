"""Studies are plug-ins: a task declares its position sets, probes, options and report; probes read sets by name.

The README's "Your own study" example is trained, probed and reported here as written (fewer steps).
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from phaselens.cli import app
from phaselens.errors import ConfigError
from phaselens.posthoc.runner import run_probes
from phaselens.probes.loss import LossProbe
from phaselens.probes.measure import measure_model
from phaselens.probes.random_z import RandomZProbe
from phaselens.report import write_report
from phaselens.run import open_run
from phaselens.tasks.batch import TaskBatch
from phaselens.training.config import load_config
from phaselens.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "docs" / "tutorials" / "own-study.md"  # the study example's page


def readme_block(language: str, marker: str) -> str:
    return next(b for b in re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S) if marker in b)


def import_readme_module(name: str, marker: str, folder: Path) -> None:
    """The README block containing `marker`, saved as module `name` and imported, as a user's plug-in module is."""
    (folder / f"{name}.py").write_text(readme_block("python", marker))
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory) -> Path:
    """The README's study, registered by running its code, trained from its YAML for 12 steps and probed."""
    root = tmp_path_factory.mktemp("recall")
    import_readme_module("recall_first_study", 'register_task("recall_first")', root)
    config = root / "recall_first.yaml"
    config.write_text(readme_block("yaml", "task: recall_first"))
    path = root / "run"
    train(load_config(config, ["train.steps=12", "train.checkpoint_every=6", "train.eval_every=6"]), path, progress=False)
    result = run_probes(path, progress=False)
    assert result.ok, result.failures
    return path


def test_a_new_study_measures_its_own_position_sets_with_the_probes_it_declares(recall_run):
    run = open_run(recall_run)
    measured = run.metrics(source="checkpoint")
    assert {"attention", "heads", "loss", "logit_lens", "attention_to"} == set(measured["probe"])
    assert set(run.metrics(probe="loss", source="checkpoint")["metric"]) == {"all", "answer"}
    mass = run.metrics(probe="attention_to", metric="mass")
    assert len(mass) == 3 * 2 * 2 and mass["value"].between(0, 1).all()  # 3 checkpoints × 2 layers × 2 heads
    with pytest.raises(ConfigError, match="random_z.*selector and read.*declares none"):
        run_probes(recall_run, probes=["random_z"], progress=False)


def test_a_task_without_a_report_section_gets_the_generic_report_never_another_studys(recall_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(recall_run, path)
    text = write_report(path).read_text()
    assert "No report section is registered for this task, so this is the generic report" in text
    assert "## Detected transitions" in text and "Final train loss" in text
    figures = sorted(p.name for p in (path / "report").glob("*.png"))
    assert figures == [f"probe_{p}.png" for p in ("attention", "attention_to", "heads", "logit_lens", "loss")]
    assert "induction" not in text.split("## Configuration")[0] and "copy" not in text  # nothing of the induction study
    import_readme_module("recall_first_report", '@register_study("recall_first")', tmp_path)  # the README's report section
    assert "Recall loss" in write_report(path).read_text()


def test_probe_batches_saved_before_position_sets_load_with_their_masks_as_named_sets(tmp_path):
    tokens = torch.arange(12).view(2, 6)
    old = {"tokens": tokens, "loss_mask": torch.ones(2, 5, dtype=torch.uint8),
           "first_target_mask": torch.eye(2, 5, dtype=torch.uint8), "selector_mask": torch.zeros(2, 6, dtype=torch.uint8),
           "pair_index": torch.tensor([1, 0])}
    save_file(old, str(tmp_path / "old.safetensors"))  # the layout probe batches had on disk before
    batch = TaskBatch.load(tmp_path / "old.safetensors")
    assert sorted(batch.positions) == ["first_target", "z"] and batch.positions["z"].dtype == torch.bool
    assert batch.predictions("first_target").tolist() == torch.eye(2, 5).bool().tolist()
    assert batch.pair_index.tolist() == [1, 0]
    batch.save(tmp_path / "new.safetensors")
    again = TaskBatch.load(tmp_path / "new.safetensors")
    assert {k: v.tolist() for k, v in again.positions.items()} == {k: v.tolist() for k, v in batch.positions.items()}


def test_the_z_shuffled_loss_and_random_z_share_one_extra_forward():
    config = load_config("disamb_small", ["data.k=4", "data.n_unique_b=20"])
    from phaselens.models import build_model

    model = build_model(config.model).eval()
    batch = config.build_task().sample(16, torch.Generator().manual_seed(0), split="probe")
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    options = config.plan("post_hoc", ["loss", "random_z"]).options
    results = dict(measure_model(model, batch, [LossProbe(**options["loss"]), RandomZProbe(**options["random_z"])]))
    assert {m.metric for m in results["loss"]} == {"all", "first_target", "z_shuffled", "z_shuffle_gap"}
    assert {m.metric for m in results["random_z"]} == {"p_drop", "argmax_change"}
    assert len(forwards) == 2  # the probe batch, and the batch with z rolled: once for both probes


def test_probe_options_from_the_command_line_override_the_tasks_and_bad_ones_are_named(run_copy):
    runner = CliRunner()
    ok = runner.invoke(app, ["probe", str(run_copy), "--probes", "logit_lens", "--steps", "20",
                             "--probe-option", "logit_lens.positions=copy", "--probe-option", "logit_lens.first_token_only=true"])
    assert ok.exit_code == 0, ok.output
    lens = open_run(run_copy).metrics(probe="logit_lens", metric="top1")
    assert len(lens) == 3
    for probe, bad, message in (("logit_lens", "logit_lens.bogus=1", "unknown option(s) ['bogus']"),
                                ("logit_lens", "nosuch.x=1", "--probe-option.nosuch: unknown probe"),
                                ("logit_lens", "logit_lens=1", "must look like probe.option=value"),
                                ("loss", "logit_lens.positions=copy", "probe option(s) for ['logit_lens'], which this sweep does not measure"),
                                ("attention_to", "attention_to.query=nowhere", "position set 'nowhere'")):
        result = runner.invoke(app, ["probe", str(run_copy), "--probes", probe, "--probe-option", bad])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_probe_options_in_a_config_reach_live_probes_and_bad_ones_name_the_key(tmp_path):
    config = load_config("induction", ["telemetry.probe_options.loss.complements=[]", "train.steps=4",
                                       "train.checkpoint_every=4", "telemetry.every=2"])
    assert config.live_plan().options["loss"] == {"positions": ["copy"], "complements": []}  # the task's, then the config's
    train(config, tmp_path / "run", progress=False)
    assert set(open_run(tmp_path / "run").metrics(probe="loss", source="live")["metric"]) == {"all", "copy", "train", "eval"}
    with pytest.raises(ConfigError, match=r"telemetry.probe_options.loss: .*unknown option\(s\) \['nope'\]"):
        load_config("induction", ["telemetry.probe_options.loss.nope=1"])
    with pytest.raises(ConfigError, match=r"telemetry.probe_options.nosuch: unknown probe"):
        load_config("induction", ["telemetry.probe_options.nosuch.x=1"])


def test_probes_never_import_a_task_or_name_one():
    """Probes read batches and their position sets only; the measurement plan also reads what studies declare."""
    tasks = {"disambiguation", "bz_to_a", "az_to_b", "b_to_a", "a_to_b", "tokenized_text"}  # (induction is also a head score)
    for path in sorted((ROOT / "src/phaselens/probes").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        allowed = {"phaselens.tasks.batch"} | ({"phaselens.tasks.study"} if path.name == "plan.py" else set())
        assert not {m for m in imported if m.startswith("phaselens.tasks") and m not in allowed}, path.name
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & tasks, f"{path.name} names a task: {strings & tasks}"


def test_every_yaml_block_of_the_study_section_is_a_valid_config():
    raw = yaml.safe_load(readme_block("yaml", "task: recall_first"))
    assert raw["data"]["task"] == "recall_first"


def test_a_sweep_axis_over_a_probe_option_gives_each_run_its_value():
    from phaselens.sweeps.grid import grid_points, parse_grid

    points = grid_points(parse_grid(["telemetry.probe_options.logit_lens.first_token_only=true,false"]))
    configs = [load_config("disamb_small", [f"{key}={value}" for key, value in point.items()]) for point in points]
    assert [c.plan("post_hoc", ["logit_lens"]).options["logit_lens"] for c in configs] == [
        {"positions": "first_target", "first_token_only": True}, {"positions": "first_target", "first_token_only": False}]


def test_asking_stored_values_for_other_options_is_refused_until_remeasure_replaces_them(run_copy):
    runner = CliRunner()
    first = runner.invoke(app, ["probe", str(run_copy), "--probes", "logit_lens", "--probe-option", "logit_lens.positions=copy"])
    assert first.exit_code == 0, first.output
    copy_top1 = open_run(run_copy).metrics(probe="logit_lens", metric="top1", source="checkpoint")
    assert open_run(run_copy).info["posthoc_probe_options"]["logit_lens"]["positions"] == "copy"

    same = runner.invoke(app, ["probe", str(run_copy), "--probes", "logit_lens", "--probe-option", "logit_lens.positions=copy"])
    assert same.exit_code == 0 and "measured 0 checkpoint(s)" in same.output, same.output

    other = ["probe", str(run_copy), "--probes", "logit_lens", "--probe-option", "logit_lens.positions=loss"]
    refused = runner.invoke(app, other)
    assert refused.exit_code != 0 and "--remeasure" in refused.output and '"positions": "copy"' in refused.output, refused.output
    assert "Traceback" not in refused.output
    partial = runner.invoke(app, [*other, "--remeasure", "--steps", "20"])
    assert partial.exit_code != 0 and "drop --steps" in partial.output, partial.output

    keep = run_copy / "artifacts" / "logit_lens" / "notes.txt"  # not phaselens's: --remeasure leaves it
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("mine")
    again = runner.invoke(app, [*other, "--remeasure"])
    assert again.exit_code == 0, again.output
    assert keep.read_text() == "mine"
    every_top1 = open_run(run_copy).metrics(probe="logit_lens", metric="top1", source="checkpoint")
    assert len(every_top1) == len(copy_top1)  # replaced, not added beside
    assert not np.allclose(every_top1["value"].to_numpy(), copy_top1["value"].to_numpy())
    assert open_run(run_copy).info["posthoc_probe_options"]["logit_lens"]["positions"] == "loss"
