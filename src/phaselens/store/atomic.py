"""Atomic file writes: write beside the target, fsync, then rename over it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask sets it: done once, at import, before any writer thread starts
    os.umask(mask)
    return mask


UMASK = _process_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private (0600); a run's files get the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any, compact: bool = False) -> None:
    """Write JSON atomically, so a reader never sees half a file.

    `compact` drops the indentation: json's fast C encoder only runs without it, which matters
    for large arrays such as attention patterns (about 10x quicker).
    """
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
