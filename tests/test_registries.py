"""Registries that check: a second definition of a taken name is refused with both definitions named,
never silently overwritten; registering the same definition again (a module imported twice) is fine."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import pytest

import phaselens.analysis.headlines as headlines
import phaselens.models.config as model_config
import phaselens.probes.base as probe_base
import phaselens.report as report
import phaselens.tasks.config as task_config
from phaselens.models.config import ModelSpec, model_config_class, register_model
from phaselens.plugins import load_package
from phaselens.probes.attention import AttentionProbe
from phaselens.probes.base import Probe, make_probe, register_probe
from phaselens.registry import DuplicateRegistration
from phaselens.tasks.config import DataConfig, register_task, task_config_class


@pytest.fixture(autouse=True)
def own_tables(monkeypatch):
    """Each test registers into copies of the registries, so nothing it adds outlives it."""
    model_config_class("transformer"), task_config_class("induction"), make_probe("attention")  # built-ins loaded
    report._load_builtin()
    load_package("phaselens.analysis")
    monkeypatch.setattr(probe_base, "_REGISTRY", dict(probe_base._REGISTRY))
    monkeypatch.setattr(model_config, "_KINDS", dict(model_config._KINDS))
    monkeypatch.setattr(task_config, "_TASKS", dict(task_config._TASKS))
    monkeypatch.setattr(report, "_STUDIES", dict(report._STUDIES))
    monkeypatch.setattr(headlines, "_HEADLINES", dict(headlines._HEADLINES))


def test_a_second_probe_named_like_a_builtin_is_refused_naming_both_classes():
    class MyAttention(Probe):
        name = "attention"

    with pytest.raises(DuplicateRegistration) as refused:
        register_probe(MyAttention)
    message = str(refused.value)
    assert "probe 'attention'" in message
    assert "phaselens.probes.attention.AttentionProbe" in message
    assert f"{__name__}.test_a_second_probe_named_like_a_builtin_is_refused_naming_both_classes.<locals>.MyAttention" in message
    assert type(make_probe("attention")) is AttentionProbe  # the first definition stays


def test_a_second_model_kind_of_the_same_name_is_refused_naming_both_configs():
    @dataclass
    class OtherTransformer(ModelSpec):
        pass

    with pytest.raises(DuplicateRegistration, match=r"model kind 'transformer' is already registered by "
                                                     r"phaselens\.models\.config\.ModelConfig; .*OtherTransformer"):
        register_model("transformer", "elsewhere:Model")(OtherTransformer)
    assert model_config_class("transformer") is model_config.ModelConfig


def test_a_second_task_of_the_same_name_is_refused_naming_both_configs():
    @dataclass
    class OtherInduction(DataConfig):
        pass

    with pytest.raises(DuplicateRegistration, match=r"task 'induction' .*InductionData; .*OtherInduction"):
        register_task("induction")(OtherInduction)


def test_a_second_report_study_or_headline_of_the_same_name_is_refused():
    def other_report(run, out):
        return None

    with pytest.raises(DuplicateRegistration, match=r"report study for task 'induction' .*other_report"):
        report.register_study("induction")(other_report)
    with pytest.raises(DuplicateRegistration, match=r"headline 'grokking' .*grokking_headline.*other_report"):
        headlines.register_headline("grokking")(other_report)


def test_registering_the_same_definition_again_is_allowed():
    assert register_probe(AttentionProbe) is AttentionProbe
    assert register_model("transformer", "phaselens.models.transformer:Transformer")(model_config.ModelConfig)


def test_a_plugin_module_imported_twice_registers_without_complaint(tmp_path, monkeypatch):
    """Re-importing a user's module runs its decorators again with new class objects of the same name."""
    (tmp_path / "my_probe_plugin.py").write_text(
        "import phaselens as pl\n\n\n@pl.register_probe\nclass Twice(pl.Probe):\n    name = 'twice'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = importlib.import_module("my_probe_plugin")
    try:
        second = importlib.reload(first)
        assert type(make_probe("twice")) is second.Twice
    finally:
        sys.modules.pop("my_probe_plugin", None)
