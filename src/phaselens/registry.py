"""Name → definition tables (probes, model kinds, tasks, report studies, headlines) that refuse a duplicate.

Every registry of phaselens is a dict filled through `register`: a second definition under a taken
name is refused with both definitions named (`module.qualname`), as pluggy refuses a second plugin
of one name, instead of silently replacing the first. Registering the same definition again is
allowed: a module imported a second time (a reload, a test re-importing a plug-in) runs its
decorators again, making a new object with the same `module.qualname`. Plain Python; imports only
`phaselens.errors`.
"""

from __future__ import annotations

from typing import TypeVar

from phaselens.errors import PhaselensError

T = TypeVar("T")


def qualified_name(definition: object) -> str:
    """`package.module.QualName` of a class or function (of its type, for any other object)."""
    target = definition if hasattr(definition, "__qualname__") else type(definition)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def _defining(definition: object) -> object:
    """What names a registered value: the value itself, or the first item of a tuple (a class and its extras)."""
    return definition[0] if isinstance(definition, tuple) and definition else definition


class DuplicateRegistration(PhaselensError, ValueError):
    """A name is registered twice by two different definitions."""


def register(table: dict[str, T], name: str, definition: T, kind: str) -> T:
    """Put `definition` in `table` under `name` and return it; refuse a different definition already there.

    Args:
        table: the registry's own dict, name → definition (a tuple's first item names it).
        kind: what the names are ("probe", "model kind", ...), for the refusal message.
    """
    if name in table:
        old, new = qualified_name(_defining(table[name])), qualified_name(_defining(definition))
        if old != new:
            raise DuplicateRegistration(f"{kind} {name!r} is already registered by {old}; {new} cannot register it "
                                        f"too (rename one of them)")
    table[name] = definition
    return definition
