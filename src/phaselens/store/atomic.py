"""Atomic file writes (write beside the target, fsync, then rename over it), and the one reader of JSON files
(`read_json`), which refuses nesting too deep to parse as malformed JSON."""

from __future__ import annotations

import contextlib
import errno
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


def parse_json(text: str) -> Any:
    """`json.loads(text)`, with nesting too deep for Python's parser (100,000 `[`, a hostile or broken file)
    refused as a ValueError like any other malformed JSON, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to be JSON that phaselens wrote") from None


def read_json(path: Path | str) -> Any:
    """The JSON file at `path`: OSError if it cannot be read, ValueError if it is not JSON (too deep included)."""
    return parse_json(Path(path).read_text())


def is_read_only(folder: Path | str) -> bool:
    """Whether files cannot be written in `folder`: a read-only file system (a read-only mount, as a shared or
    archived run is), or a folder this user may not write (the mode; root writes whatever the mode says)."""
    folder = Path(folder)
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return not os.access(folder, os.W_OK)


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk: ENOSPC / EDQUOT, or SQLite's
    "database or disk is full"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_of(path: Path | str) -> str:
    """The disk (mount point) holding `path`, with the space left on it: "/data (12.0 MB free)"."""
    import shutil

    folder = Path(os.path.abspath(path))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return f"{mount} ({free})"
