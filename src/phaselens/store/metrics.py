"""metrics.sqlite: one row per value (step, probe, metric, layer, head, value, source).

WAL mode lets a dashboard read while training writes. The store never imports torch: rows
arrive as plain Python tuples. `MetricsWriter` moves the writes off the training thread.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import pandas as pd

from phaselens.background import OrderedThread
from phaselens.errors import StoreError
from phaselens.store.atomic import disk_of, is_read_only

COLUMNS = ["step", "probe", "metric", "layer", "head", "value", "source"]
LOCK_WAIT = 30.0  # seconds a connection waits for another process's lock on metrics.sqlite before giving up
Row = tuple  # (step, probe, metric, layer | None, head | None, value, source)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    step   INTEGER NOT NULL,
    probe  TEXT    NOT NULL,
    metric TEXT    NOT NULL,
    layer  INTEGER,
    head   INTEGER,
    value  REAL,
    source TEXT    NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS metrics_key
    ON metrics (probe, metric, source, step, ifnull(layer, -1), ifnull(head, -1));
CREATE TABLE IF NOT EXISTS failures (
    step   INTEGER NOT NULL,
    probe  TEXT    NOT NULL,
    reason TEXT    NOT NULL,
    PRIMARY KEY (step, probe)
);
"""


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """Open metrics.sqlite in WAL mode (readers never block the writer)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=LOCK_WAIT)
    else:
        conn = sqlite3.connect(str(path), timeout=LOCK_WAIT)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    return conn


def damaged(path: Path, exc: Exception) -> StoreError:
    """The error for a metrics.sqlite SQLite cannot read: the file, what is wrong, and what survives."""
    return StoreError(
        f"{path} is damaged ({exc}): its metric rows cannot be read. The run's checkpoints, run.json and artifacts "
        f"are separate files and intact; move {path.name} aside and measure the checkpoints again with "
        f"`phaselens probe {path.parent}` (live telemetry is only in the damaged file)")


def store_error(path: Path, exc: Exception) -> StoreError:
    """The one-line error for SQLite failing on metrics.sqlite: locked by another process, a full disk, a
    read-only run, or (only when it is none of these) a damaged file."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StoreError(f"{path} is locked by another process (waited {LOCK_WAIT:g} s for it): close what holds it "
                          "(a sqlite3 shell, a database browser, a stuck process) and run the command again")
    if "disk is full" in text or "no space" in text or ("disk i/o error" in text and _almost_no_space(path)):
        return StoreError(f"the disk holding {path}, {disk_of(path)}, is full ({exc}): free space and run the command "
                          "again; the rows written before it filled are kept")
    if "readonly" in text or "read-only" in text or is_read_only(path.parent):
        return StoreError(f"{path} is read-only ({exc}): this command writes metric rows into the run; make the run "
                          "writable or copy it somewhere writable")
    if "disk i/o error" in text:  # the disk failed a read or write: the file need not be damaged
        return StoreError(f"SQLite could not read or write {path} ({exc}): check the disk holding it and run the command again")
    return damaged(path, exc)


def _almost_no_space(path: Path) -> bool:
    """Whether the disk holding `path` has less than a megabyte left (SQLite calls a write it cannot place there an I/O error)."""
    import shutil

    try:
        return shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        return False


def _sql_errors(method):
    """MetricsStore methods raise `store_error`'s one line, never a raw sqlite3 error."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, pd.errors.DatabaseError) as exc:
            raise store_error(self.path, exc) from exc

    return wrapper


def read_only_connection(path: Path) -> sqlite3.Connection:
    """A connection that never writes (`mode=ro`). In a read-only run without the WAL's -shm file (which SQLite
    cannot make there), `immutable=1`: safe when no write-ahead log holds rows, since no one can write the file."""
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    if is_read_only(path.parent) and not shm.exists():
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(f"{path} is read-only and its write-ahead log {wal.name} holds rows SQLite reads only where "
                             f"it can write {shm.name}: copy the run somewhere writable to read it")
        return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=LOCK_WAIT)
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=LOCK_WAIT)


def integrity_problem(path: Path) -> str | None:
    """What SQLite's quick_check finds wrong with the metrics store at `path` (None: it reads cleanly)."""
    try:
        conn = read_only_connection(path)
        try:
            result = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            conn.execute("SELECT count(*) FROM metrics").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if result == ["ok"] else "; ".join(result[:3])


def set_aside(path: Path) -> Path:
    """Rename a damaged store (and its WAL files) to metrics.sqlite.damaged[-N]; returns the new path."""
    n, kept = 1, path.with_name(path.name + ".damaged")
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(kept)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(kept.with_name(kept.name + suffix))
    return kept


class MetricsStore:
    """Read and write access to one run's metrics.sqlite.

    `create=False` (readers: reports, exports, the dashboard) never creates a store: a missing
    file raises StoreError, as does one SQLite cannot read.
    """

    def __init__(self, path: Path | str, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path} is missing: this run has no metric rows (a run keeps them in metrics.sqlite; "
                             f"`phaselens probe {self.path.parent}` measures its checkpoints into a new one)")
        try:
            self._conn = connect(self.path) if create else read_only_connection(self.path)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc

    @_sql_errors
    def write(self, rows: Iterable[Row]) -> None:
        """Insert rows; a row with the same (probe, metric, source, step, layer, head) is replaced."""
        with self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO metrics (step, probe, metric, layer, head, value, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    @_sql_errors
    def delete_from_step(self, step: int, source: str = "live") -> int:
        """Drop rows at or after `step` (a resumed run rewrites them); returns how many went."""
        with self._conn:
            return self._conn.execute("DELETE FROM metrics WHERE step >= ? AND source = ?", (step, source)).rowcount

    def read(
        self,
        probe: str | None = None,
        metric: str | None = None,
        source: str | None = None,
        layer: int | None = None,
        head: int | None = None,
    ) -> pd.DataFrame:
        """Rows matching every filter given, ordered by probe, metric, step, layer, head."""
        where, args = [], []
        for column, value in (("probe", probe), ("metric", metric), ("source", source), ("layer", layer), ("head", head)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {', '.join(COLUMNS)} FROM metrics"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY probe, metric, source, step, layer, head"
        try:
            frame = pd.read_sql_query(sql, self._conn, params=args)
        except (sqlite3.Error, pd.errors.DatabaseError) as exc:
            raise store_error(self.path, exc) from exc
        for column in ("layer", "head"):
            frame[column] = frame[column].astype("Int64")
        return frame

    @_sql_errors
    def stored_pairs(self, source: str) -> set[tuple[int, str]]:
        """The (step, probe) pairs that already have rows from `source` (to skip on resume)."""
        cur = self._conn.execute("SELECT DISTINCT step, probe FROM metrics WHERE source = ?", (source,))
        return {(int(s), p) for s, p in cur.fetchall()}

    @_sql_errors
    def delete_probe(self, probe: str, source: str, steps: Iterable[int] | None = None) -> int:
        """Drop `probe`'s rows from `source` (at `steps`, or at every step), to measure them again; returns how many went."""
        with self._conn:
            if steps is None:
                return self._conn.execute("DELETE FROM metrics WHERE probe = ? AND source = ?", (probe, source)).rowcount
            return self._conn.executemany("DELETE FROM metrics WHERE probe = ? AND source = ? AND step = ?",
                                          [(probe, source, step) for step in steps]).rowcount

    @_sql_errors
    def delete_metrics(self, probe: str, source: str, names: Iterable[str] = (), prefixes: Iterable[str] = ()) -> int:
        """Drop `probe`'s rows from `source` whose metric is one of `names` or starts with one of `prefixes`
        (a derived series recomputed whole, e.g. the circuits' Jaccard); returns how many went."""
        gone = 0
        with self._conn:
            for name in names:
                gone += self._conn.execute("DELETE FROM metrics WHERE probe = ? AND source = ? AND metric = ?",
                                           (probe, source, name)).rowcount
            for prefix in prefixes:
                gone += self._conn.execute("DELETE FROM metrics WHERE probe = ? AND source = ? AND substr(metric, 1, ?) = ?",
                                           (probe, source, len(prefix), prefix)).rowcount
        return gone

    @_sql_errors
    def claim_write_lock(self) -> None:
        """Take SQLite's write lock and let it go (waiting up to LOCK_WAIT for another process holding it): a command
        that will write finds a locked store before its work, not after."""
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.execute("ROLLBACK")

    @_sql_errors
    def record_failure(self, step: int, probe: str, reason: str) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (step, probe, reason))

    @_sql_errors
    def clear_failures(self, steps: Iterable[int]) -> None:
        """Forget recorded failures at `steps` (they have now been measured)."""
        with self._conn:
            self._conn.executemany("DELETE FROM failures WHERE step = ?", [(step,) for step in steps])

    @_sql_errors
    def failures(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT step, probe, reason FROM failures ORDER BY step, probe", self._conn)

    def close(self) -> None:
        self._conn.close()


class RowMirror(Protocol):
    """Somewhere else the metrics writer copies its rows to (`store.tensorboard.TensorBoardLog`)."""

    def write(self, rows: Iterable[Row]) -> Any: ...

    def close(self) -> None: ...


class MetricsWriter:
    """Writes rows to metrics.sqlite from a background thread, so training never waits on disk."""

    def __init__(self, path: Path | str, mirror: RowMirror | None = None):
        """`mirror`: also hands every row to it, on the writer thread after the store has it (a TensorBoard log)."""
        self.path = Path(path)
        MetricsStore(self.path).close()  # create the schema before training starts
        self._store: MetricsStore | None = None  # opened on the writer thread (SQLite connections stay on theirs)
        self._mirror = mirror
        self._worker = OrderedThread("phaselens-metrics-writer", f"writing {self.path}")

    def _write(self, rows: list[Row]) -> None:
        if self._store is None:
            self._store = MetricsStore(self.path)
        self._store.write(rows)
        if self._mirror is not None:
            self._mirror.write(rows)

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._mirror is not None:
            self._mirror.close()

    def write(self, rows: Sequence[Row]) -> None:
        if rows:
            rows = list(rows)
            self._worker.submit(lambda: self._write(rows))

    def flush(self) -> None:
        """Block until every queued row is on disk; re-raise a write error from the thread."""
        self._worker.wait()

    def close(self) -> None:
        """Write what is queued and stop the thread (re-raising a write error after it stopped)."""
        try:
            self.flush()
        finally:
            self._worker.close(cleanup=self._close_store)
