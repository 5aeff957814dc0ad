"""The measurement plan decides, for every task, model kind, probe and mode, what is measured and how.

`tests/golden/measurement_plan.json` holds the answers phaselens gave before the plan existed, when
seven places decided them (config validation, the post-hoc runner's resolve_probes / _for_architecture
/ resolve_options, the study's batch_for, the runner's run-file writers): one row per (task, model,
probe, live | checkpoint | post_hoc), either planned (options, batch, run files) or refused (reason).
The plan must give the same decisions, except in the rows named in FIXED, which were bugs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import phaselens.probes  # noqa: F401
from phaselens.errors import ConfigError, PhaselensError
from phaselens.probes.base import probe_names
from phaselens.probes.plan import PlanContext, plan_probes
from phaselens.tasks.config import task_names
from phaselens.training.config import RunConfig, from_dict

GOLDEN = Path(__file__).parent / "golden" / "measurement_plan.json"

MODELS = {
    "transformer": {"kind": "transformer", "n_layers": 2, "n_heads": 2, "d_model": 32, "d_mlp": 64},
    "transformer_attn_only": {"kind": "transformer", "n_layers": 2, "n_heads": 2, "d_model": 32, "d_mlp": 0},
    "bdh": {"kind": "bdh", "n_layers": 2, "d_model": 32, "n_heads": 2, "multiplier": 4},
    "hf": {"kind": "hf", "source": "somewhere", "local": True, "revision": "step1", "architecture": "GPTNeoXForCausalLM",
           "n_layers": 2, "n_heads": 2, "d_model": 32},
}
DATA = {"text": {"corpus": "shakespeare"}, "modular_addition": {"p": 7}, "hf_trainer": {"seq_len": 32}}
INDUCTION_LIKE = ("heads", "attention_to", "patching")  # read the induction batch where a run keeps one

# Rows added to the golden on purpose, with their probe: `essential_dynamics` (post-hoc and at checkpoints on the
# probe batch, no run files, default options; live refused: it runs on checkpoints only; refused wherever the
# config itself is, as every probe is: hf_trainer checkpoints, tokenized_text without data.path).
# Rows whose answer the plan changes on purpose (row key prefix -> why). Every other row is as before.
FIXED = {
    # BDH has no softmax pattern and no final norm, but residual streams and an unembedding: geometry
    # was planned before too and then failed on every checkpoint (blocks.0.hook_resid_pre); the probe now
    # reads the adapter's sites, so the plan is unchanged and the measurement works (test_bdh).
    # Live defaults on BDH were the study's (attention, heads, loss), which the config then refused.
    "live_defaults@bdh": "the study's live probes less those BDH cannot run",
    # grokking reads the position sets answer and train_pairs: planned on other tasks, it failed per checkpoint
    "grokking@not-modular_addition": "refused: the batch has no answer / train_pairs position sets",
    # heads on modular addition was refused post-hoc only: live and at checkpoints it measured 4-token batches
    "heads/live@modular_addition": "refused in every mode, as post-hoc",
    "heads/checkpoint@modular_addition": "refused in every mode, as post-hoc",
    # attention_to, patching and random_z with no position sets declared were planned live / at checkpoints
    # and failed there; now refused in every mode (their position options are unset)
    "no-position-sets/checkpoint": "refused at checkpoints, as post-hoc",
    # the batch now says which batch is read: runs that keep no induction batch read the probe batch
    "induction-batch-label": "batch 'probe' where the run keeps no induction batch",
}


def config_for(task: str, model: str, telemetry: dict | None = None) -> RunConfig:
    shape = {"d_vocab": 256 if task == "text" else 64, "n_ctx": 64}
    raw = {"name": "t", "model": {**MODELS[model], **shape}, "data": {"task": task, **DATA.get(task, {})},
           "telemetry": telemetry or {}}
    return from_dict(RunConfig, raw, origin="table")


def jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def post_hoc(config: RunConfig, probe: str) -> dict:
    try:
        plan = plan_probes(PlanContext.of(config), "post_hoc", [probe]).require()
    except PhaselensError as exc:
        return {"refused": str(exc)}
    (planned,) = plan.probes
    return {"options": jsonable(planned.options), "batch": planned.batch, "run_files": list(planned.run_files)}


def trained(task: str, model: str, probe: str, key: str) -> dict:
    """What config validation says of `probe` in telemetry.<key>, and what the trainer would measure."""
    try:
        config = config_for(task, model, {"probes": ["loss"], key: [probe]})
        config.validate()
    except PhaselensError as exc:
        return {"refused": str(exc)}
    plan = config.live_plan() if key == "probes" else config.checkpoint_plan()
    planned = next(p for p in plan.probes if p.name == probe)
    return {"options": jsonable(planned.options), "batch": planned.batch}


def table() -> dict:
    rows = {}
    for task in task_names():
        for model in MODELS:
            config = config_for(task, model)
            context = PlanContext.of(config)
            entry = {"post_hoc_defaults": plan_probes(context, "post_hoc").names,
                     "live_defaults": plan_probes(context, "live").names}
            for probe in probe_names():
                entry[f"{probe}/post_hoc"] = post_hoc(config, probe)
                entry[f"{probe}/live"] = trained(task, model, probe, "probes")
                entry[f"{probe}/checkpoint"] = trained(task, model, probe, "checkpoint_probes")
            rows[f"{task}/{model}"] = entry
    return rows


def decision(row):
    """What a row decides, without the reason's wording (planned: options and batch; refused: that it is)."""
    if isinstance(row, list):
        return row
    if "refused" in row:
        return "refused"
    return {"options": row["options"], "batch": row["batch"], **({"run_files": row["run_files"]} if "run_files" in row else {})}


def fixed_by_design(combo: str, key: str, before, after) -> bool:
    """Whether a changed row is one of FIXED."""
    task, model = combo.split("/")
    probe, _, mode = key.partition("/")
    if key == "live_defaults" and model == "bdh":
        return after == [p for p in before if p not in ("attention", "heads")]
    if probe == "grokking" and task != "modular_addition":
        return after == "refused"
    if probe == "heads" and task == "modular_addition":
        return after == "refused"
    if probe in ("attention_to", "patching", "random_z") and mode == "checkpoint" and after == "refused":
        return before != "refused"
    if probe in INDUCTION_LIKE and before != "refused" and after != "refused":
        return before["batch"] == "induction" and after["batch"] == "probe" and {**before, "batch": "probe"} == after
    return False


@pytest.fixture(scope="module")
def now() -> dict:
    return table()


def test_every_decision_is_the_one_phaselens_made_before_the_plan_except_the_fixed_bugs(now):
    before = json.loads(GOLDEN.read_text())
    assert before.keys() <= now.keys()  # tasks added since the golden (own_loop) have no "before"
    changed = []
    for combo, rows in before.items():
        # probes added since the golden was recorded (circuits) have no "before": only the golden's probes are
        # compared, and each new probe pins its own plan rows in its test file (tests/test_circuits.py)
        golden_probes = {key.split("/")[0] for key in rows if "/" in key}
        current = {key for key in now[combo] if "/" not in key or key.split("/")[0] in golden_probes}
        assert current == rows.keys(), combo
        for key, row in rows.items():
            old, new = decision(row), decision(now[combo][key])
            if old != new and not fixed_by_design(combo, key, old, new):
                changed.append(f"{combo} {key}: {old} -> {new}")
    assert not changed, "\n".join(changed)


def test_every_refusal_names_the_probe_and_says_why(now):
    for combo, rows in now.items():
        for key, row in rows.items():
            if isinstance(row, dict) and "refused" in row:
                probe = key.split("/")[0]
                assert probe in row["refused"] or "data." in row["refused"] or "Trainer" in row["refused"], (combo, key, row)
                assert len(row["refused"]) > 30


def test_bdh_plans_geometry_on_its_own_residual_sites_and_refuses_patterns_with_the_reason(now):
    assert now["text/bdh"]["geometry/post_hoc"]["batch"] == "probe"
    assert "unigram" in now["text/bdh"]["geometry/post_hoc"]["run_files"]
    reason = now["text/bdh"]["heads/post_hoc"]["refused"]
    assert "softmax attention patterns" in reason and "model.kind=bdh" in reason


def test_a_position_option_naming_a_set_the_batch_lacks_is_refused_before_anything_loads():
    config = config_for("induction", "transformer")
    context = PlanContext.of(config)
    plan = plan_probes(context, "post_hoc", ["loss"], given={"loss": {"positions": ["first_target"]}})
    assert plan.refused and "first_target" in plan.refused[0].reason and "copy, source" in plan.refused[0].reason
    with pytest.raises(ConfigError, match="first_target"):
        plan.require("--probe-option")


def test_options_merge_study_then_config_then_command_key_by_key():
    config = config_for("bz_to_a", "transformer")
    config.telemetry.probe_options = {"loss": {"shuffle": None}}
    plan = config.plan("post_hoc", ["loss"], {"loss": {"positions": ["first_target"], "icl_score": False}})
    assert plan.options["loss"] == {"positions": ["first_target"], "shuffle": None, "icl_score": False}


def test_the_geometry_cadence_holds_live_only():
    config = config_for("text", "transformer")
    config.telemetry.geometry_every = 7
    assert config.plan("live", ["geometry"]).options["geometry"]["every"] == 7
    assert "every" not in config.plan("checkpoint", ["geometry"]).options["geometry"]


def test_options_for_a_probe_not_measured_are_refused():
    config = config_for("induction", "transformer")
    with pytest.raises(ConfigError, match="does not measure"):
        config.plan("post_hoc", ["loss"], {"heads": {}})


def test_the_readmes_plan_example_runs_as_written_on_a_trained_run(run_copy):
    import re

    import phaselens as pl

    readme = (Path(__file__).resolve().parents[1] / "docs" / "concepts" / "measurement-plan.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "run.plan(" in b)
    namespace = {"run": pl.open_run(run_copy)}
    exec(block, namespace)
    plan = namespace["plan"]
    assert plan.names == ["heads", "geometry"] and plan.options["geometry"] == {"beta": 2.0}
    assert plan.routes == {"heads": "probe", "geometry": "probe"}  # an induction run's probe batch is its induction batch
    assert plan.run_files == ["unigram"] and plan.refused == []
