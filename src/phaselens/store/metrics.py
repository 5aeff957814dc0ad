"""metrics.sqlite: one row per value (step, probe, metric, layer, head, value, source).

WAL mode lets a dashboard read while training writes. The store never imports torch: rows
arrive as plain Python tuples. `MetricsWriter` moves the writes off the training thread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from phaselens.background import OrderedThread
from phaselens.errors import StoreError

COLUMNS = ["step", "probe", "metric", "layer", "head", "value", "source"]
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
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    else:
        conn = sqlite3.connect(str(path), timeout=30)
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


def integrity_problem(path: Path) -> str | None:
    """What SQLite's quick_check finds wrong with the metrics store at `path` (None: it reads cleanly)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
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
            self._conn = connect(self.path) if create else sqlite3.connect(str(self.path), timeout=30)
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from exc

    def write(self, rows: Iterable[Row]) -> None:
        """Insert rows; a row with the same (probe, metric, source, step, layer, head) is replaced."""
        with self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO metrics (step, probe, metric, layer, head, value, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

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
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as exc:
            raise damaged(self.path, exc) from exc
        for column in ("layer", "head"):
            frame[column] = frame[column].astype("Int64")
        return frame

    def stored_pairs(self, source: str) -> set[tuple[int, str]]:
        """The (step, probe) pairs that already have rows from `source` (to skip on resume)."""
        cur = self._conn.execute("SELECT DISTINCT step, probe FROM metrics WHERE source = ?", (source,))
        return {(int(s), p) for s, p in cur.fetchall()}

    def delete_probe(self, probe: str, source: str, steps: Iterable[int] | None = None) -> int:
        """Drop `probe`'s rows from `source` (at `steps`, or at every step), to measure them again; returns how many went."""
        with self._conn:
            if steps is None:
                return self._conn.execute("DELETE FROM metrics WHERE probe = ? AND source = ?", (probe, source)).rowcount
            return self._conn.executemany("DELETE FROM metrics WHERE probe = ? AND source = ? AND step = ?",
                                          [(probe, source, step) for step in steps]).rowcount

    def record_failure(self, step: int, probe: str, reason: str) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (step, probe, reason))

    def clear_failures(self, steps: Iterable[int]) -> None:
        """Forget recorded failures at `steps` (they have now been measured)."""
        with self._conn:
            self._conn.executemany("DELETE FROM failures WHERE step = ?", [(step,) for step in steps])

    def failures(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT step, probe, reason FROM failures ORDER BY step, probe", self._conn)

    def close(self) -> None:
        self._conn.close()


class MetricsWriter:
    """Writes rows to metrics.sqlite from a background thread, so training never waits on disk."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        MetricsStore(self.path).close()  # create the schema before training starts
        self._store: MetricsStore | None = None  # opened on the writer thread (SQLite connections stay on theirs)
        self._worker = OrderedThread("phaselens-metrics-writer", f"writing {self.path}")

    def _write(self, rows: list[Row]) -> None:
        if self._store is None:
            self._store = MetricsStore(self.path)
        self._store.write(rows)

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

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
