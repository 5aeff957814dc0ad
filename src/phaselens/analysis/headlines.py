"""A study's headline per run (e.g. τ of late disambiguation), found by the name its task declares.

The task declares `Headline(name, metric, axes)` (`phaselens.tasks.study`); the analysis that
computes it from a run registers here under that name, so `compare` asks for it without knowing
the study. A headline function returns the run's row of `compare`: the metric and whatever else
explains it (plateau, transition steps), keyed by column name.
"""

from __future__ import annotations

from typing import Any, Callable

from phaselens.errors import RunError
from phaselens.registry import register

HeadlineFunction = Callable[[Any], dict[str, object]]
_HEADLINES: dict[str, HeadlineFunction] = {}


def register_headline(name: str) -> Callable[[HeadlineFunction], HeadlineFunction]:
    """Decorator: `function(run)` computes headline `name` of a run as a dict of `compare` columns."""

    def add(function: HeadlineFunction) -> HeadlineFunction:
        return register(_HEADLINES, name, function, "headline")

    return add


def headline_values(name: str, run: Any) -> dict[str, object]:
    """The `compare` columns of headline `name` for `run`."""
    from phaselens.plugins import load_package

    load_package("phaselens.analysis")  # every analysis module registers its headlines
    if name not in _HEADLINES:
        raise RunError(f"no analysis computes the headline {name!r} (registered: {', '.join(sorted(_HEADLINES)) or 'none'})")
    return _HEADLINES[name](run)
