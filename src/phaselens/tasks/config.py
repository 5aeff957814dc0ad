"""Task configurations (the `data` section) and their registry; torch-free.

Each task registers a `DataConfig` subclass under one or more names; `data.task` picks it, so
`data.<option>` overrides are checked against the options of that task only. `build(model)`
returns the task object, whose `sample(n, generator, split)` draws a `TaskBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from phaselens.errors import ConfigError
from phaselens.registry import register
from phaselens.tasks.study import GENERIC, Study

_TASKS: dict[str, type["DataConfig"]] = {}


def register_task(*names: str) -> Callable[[type["DataConfig"]], type["DataConfig"]]:
    """Class decorator: `data.task=<name>` selects this `DataConfig` subclass (a taken name is refused, naming both)."""

    def add(cls: type[DataConfig]) -> type[DataConfig]:
        for name in names:
            register(_TASKS, name, cls, "task")
        return cls

    return add


def task_names() -> list[str]:
    _load_builtin()
    return sorted(_TASKS)


def task_config_class(name: str) -> type["DataConfig"]:
    _load_builtin()
    if name not in _TASKS:
        raise ConfigError(f"data.task must be one of {sorted(_TASKS)}, got {name!r} (a task of your own: import the module "
                          "that registers it, or name that module under the 'phaselens.plugins' entry point; docs/tutorials/own-study.md)")
    return _TASKS[name]


def task_study(name: str) -> Study:
    """What task `name` declares (probes, their options, headline); see `phaselens.tasks.study`."""
    return task_config_class(name).study_for(name)


def _load_builtin() -> None:
    from phaselens.plugins import load_package

    load_package("phaselens.tasks", suffix="_config")  # every task's config module registers itself


@dataclass
class DataConfig:
    """Options every task has. Subclasses add their own and implement `build`."""

    task: str = "induction"
    probe_size: int = 64  # fixed probe batch, measured at every checkpoint (during training and post-hoc)
    eval_size: int = 128  # fixed held-out batch for the periodic eval loss

    # What the task declares so that probes, report and compare need no branch on it.
    study: ClassVar[Study] = GENERIC
    # True when the splits are fixed sets of examples: a size of 0 (probe_size, eval_size,
    # train.batch_size) then means the whole split.
    fixed_splits: ClassVar[bool] = False
    # False when phaselens does not keep the data (a Trainer's dataset): files drawn from it (an induction
    # batch, a training sample) cannot be written after training
    rebuildable: ClassVar[bool] = True

    @classmethod
    def study_for(cls, task: str) -> Study:
        """The study of variant `task` (a class may serve several)."""
        return cls.study

    @classmethod
    def resolve(cls, raw: dict[str, Any]) -> type["DataConfig"]:
        """The registered subclass for `raw['task']` (the config loader calls this)."""
        return task_config_class(raw.get("task", cls.task))

    def validate(self, model: Any) -> None:
        least = 0 if self.fixed_splits else 1
        for key in ("probe_size", "eval_size"):
            if getattr(self, key) < least:
                raise ConfigError(f"data.{key} must be >= {least}" + (" (0: the whole split)" if least == 0 else "")
                                  + f", got {getattr(self, key)}")
        self.build(model).validate()

    def build(self, model: Any):
        """The task object for this config; `model` is the model config (context length, vocabulary)."""
        raise NotImplementedError
