"""Bad configuration is refused before training starts, with a message naming the key (and file)."""

from __future__ import annotations

import pytest

from phaselens.errors import ConfigError
from phaselens.training.config import load_config


def config_error(source, overrides=()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(source, list(overrides))
    return str(caught.value)


# ---------------------------------------------------------------------------- unknown keys


def test_unknown_override_key_is_named():
    message = config_error("induction", ["model.n_layer=2"])
    assert "model.n_layer" in message
    assert "n_layers" in message  # the valid keys are listed, so the typo is easy to spot


def test_unknown_section_is_named():
    assert "optimiser" in config_error("induction", ["optimiser.lr=0.1"])


def test_unknown_key_in_a_yaml_file_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text("model:\n  n_layers: 2\n  n_head: 4\n")
    message = config_error(path)
    assert "model.n_head" in message
    assert str(path) in message


# ---------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("model.n_heads=2.5", "model.n_heads"),
        ("train.lr=fast", "train.lr"),
        ("train.batch_size=[32]", "train.batch_size"),
    ],
)
def test_wrong_type_names_the_key_and_the_value(override, key):
    message = config_error("induction", [override])
    assert key in message
    assert override.split("=", 1)[1] in message


def test_wrong_type_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "typed.yaml"
    path.write_text("train:\n  steps: many\n")
    message = config_error(path)
    assert "train.steps" in message and str(path) in message


# ---------------------------------------------------------------------------- impossible shapes


def test_d_model_not_divisible_by_heads_without_d_head_is_refused():
    message = config_error("induction", ["model.d_model=63", "model.n_heads=2"])
    assert "model.d_model" in message and "model.n_heads" in message


def test_d_model_not_divisible_by_heads_is_fine_with_an_explicit_d_head():
    config = load_config("induction", ["model.d_model=63", "model.n_heads=2", "model.d_head=16"])
    assert (config.model.d_model, config.model.d_head) == (63, 16)


def test_segment_and_repeat_longer_than_the_context_is_refused():
    message = config_error("induction", ["data.max_len=40"])  # 2 * 40 > n_ctx = 64
    assert "data.max_len" in message and "n_ctx" in message


def test_zero_layers_is_refused():
    assert "model.n_layers" in config_error("induction", ["model.n_layers=0"])


def test_negative_d_head_is_reported_as_negative_not_as_unset():
    message = config_error("induction", ["model.d_head=-4"])
    assert "model.d_head" in message and "-4" in message


def test_non_positive_steps_is_refused():
    assert "train.steps" in config_error("induction", ["train.steps=0"])


# ---------------------------------------------------------------------------- other bad input


def test_unknown_telemetry_probe_is_named():
    message = config_error("induction", ["telemetry.probes=attention,atention"])
    assert "telemetry.probes" in message and "atention" in message


def test_infinite_learning_rate_is_refused():
    assert "train.lr" in config_error("induction", ["train.lr=1e400"])


def test_unknown_schedule_is_refused():
    message = config_error("induction", ["train.schedule=linear"])
    assert "train.schedule" in message and "linear" in message


def test_missing_config_file_is_named(tmp_path):
    path = tmp_path / "nowhere.yaml"
    message = config_error(path)
    assert str(path) in message


def test_unknown_preset_lists_the_presets():
    message = config_error("inducton")
    assert "inducton" in message and "induction" in message


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  n_layers: [2\n")
    message = config_error(path)
    assert str(path) in message and "YAML" in message


def test_override_without_equals_sign_is_refused():
    assert "train.steps" in config_error("induction", ["train.steps"])


# ---------------------------------------------------------------------------- valid overrides


def test_learning_rate_in_exponent_notation_is_a_float():
    config = load_config("induction", ["train.lr=3e-4"])
    assert isinstance(config.train.lr, float)
    assert config.train.lr == 0.0003


def test_layer_count_override_applies_and_keeps_the_rest_of_the_preset():
    config = load_config("induction", ["model.n_layers=1"])
    assert config.model.n_layers == 1
    assert (config.model.n_heads, config.model.d_model, config.model.d_vocab) == (2, 64, 64)


def test_probe_list_override_is_comma_separated():
    config = load_config("induction", ["telemetry.probes=attention,loss"])
    assert config.telemetry.probes == ["attention", "loss"]


def test_yaml_file_with_overrides_on_top(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("model:\n  n_layers: 1\n  d_model: 32\ntrain:\n  steps: 50\n")
    config = load_config(path, ["train.steps=60"])
    assert (config.model.n_layers, config.model.d_model, config.model.d_head) == (1, 32, 16)
    assert config.train.steps == 60
    assert config.name == "small"


# ---------------------------------------------------------------------------- tasks and model kinds


def test_unknown_task_and_model_kind_list_the_registered_ones():
    message = config_error("induction", ["data.task=sorting"])
    assert "data.task" in message and "induction" in message
    message = config_error("induction", ["model.kind=lstm"])
    assert "model.kind" in message and "transformer" in message


def test_options_are_checked_against_the_chosen_task():
    # `variant` is an induction option; a key no task of this name has is refused by name
    assert "data.k" in config_error("induction", ["data.k=10"])
    assert load_config("induction", ["data.variant=half_repeat"]).data.variant == "half_repeat"
