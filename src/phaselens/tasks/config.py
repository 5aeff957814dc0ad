"""Task configurations (the `data` section) and their registry; torch-free.

Each task registers a `DataConfig` subclass under one or more names; `data.task` picks it, so
`data.<option>` overrides are checked against the options of that task only. `build(model)`
returns the task object, whose `sample(n, generator, split)` draws a `TaskBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from phaselens.errors import ConfigError

SPLITS = ("train", "eval", "probe")
_TASKS: dict[str, type["DataConfig"]] = {}


def register_task(*names: str) -> Callable[[type["DataConfig"]], type["DataConfig"]]:
    """Class decorator: `data.task=<name>` selects this `DataConfig` subclass."""

    def add(cls: type[DataConfig]) -> type[DataConfig]:
        for name in names:
            _TASKS[name] = cls
        return cls

    return add


def task_names() -> list[str]:
    _load_builtin()
    return sorted(_TASKS)


def task_config_class(name: str) -> type["DataConfig"]:
    _load_builtin()
    if name not in _TASKS:
        raise ConfigError(f"data.task must be one of {sorted(_TASKS)}, got {name!r}")
    return _TASKS[name]


def _load_builtin() -> None:
    import phaselens.tasks.induction_config  # noqa: F401
    import phaselens.tasks.tokenized_text_config  # noqa: F401
    import phaselens.tasks.disambiguation_config  # noqa: F401
    import phaselens.tasks.text_config  # noqa: F401


DEFAULT_PROBES = ("attention", "heads", "loss", "logit_lens", "attention_to", "patching")


@dataclass
class DataConfig:
    """Options every task has. Subclasses add their own and implement `build`."""

    task: str = "induction"
    probe_size: int = 64  # fixed probe batch, measured at every checkpoint (during training and post-hoc)
    eval_size: int = 128  # fixed held-out batch for the periodic eval loss

    # Post-hoc probes: what `phaselens probe` measures by default, and the probes this task's
    # batches cannot feed (name -> why), refused by name when asked for.
    default_probes: ClassVar[tuple[str, ...]] = DEFAULT_PROBES
    inapplicable_probes: ClassVar[dict[str, str]] = {}

    @classmethod
    def default_probes_for(cls, task: str) -> tuple[str, ...]:
        """The default post-hoc probes of variant `task` (a class may serve several)."""
        return cls.default_probes

    @classmethod
    def resolve(cls, raw: dict[str, Any]) -> type["DataConfig"]:
        """The registered subclass for `raw['task']` (the config loader calls this)."""
        return task_config_class(raw.get("task", cls.task))

    def validate(self, model: Any) -> None:
        for key in ("probe_size", "eval_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        self.build(model).validate()

    def build(self, model: Any):
        """The task object for this config; `model` is the model config (context length, vocabulary)."""
        raise NotImplementedError
