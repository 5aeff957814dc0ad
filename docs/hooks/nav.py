"""mkdocs hook: leave nav entries whose page does not exist (yet) out of the site's navigation."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def existing(entries: list[Any], docs: Path) -> list[Any]:
    """The nav entries whose Markdown file is in `docs`; sections that end up empty are dropped."""
    kept: list[Any] = []
    for entry in entries:
        if isinstance(entry, dict):
            (title, target), = entry.items()
            if isinstance(target, list):
                children = existing(target, docs)
                if children:
                    kept.append({title: children})
            elif (docs / target).is_file() or "://" in str(target):
                kept.append(entry)
        elif (docs / str(entry)).is_file():
            kept.append(entry)
    return kept


def on_config(config, **kwargs):
    config["nav"] = existing(config["nav"] or [], Path(config["docs_dir"]))
    return config
