"""The one live-or-checkpoint rule: which source's rows a view of a metrics table reads.

A value can be stored twice: live, measured inside training on the training batch, and checkpoint,
measured afterwards on the fixed probe batch (`source` column of metrics.sqlite). The two differ in
batch and noise, so one curve must never mix them. The rule chooses per series, a series being
one (probe, metric, layer, head):

    prefer="live"        the series' live rows where it has any, else its checkpoint rows
    prefer="checkpoint"  the series' checkpoint rows where it has any, else its live rows
    prefer="densest"     the series' rows from the source with more distinct steps (a tie: checkpoint)
    prefer=None          every row of both sources (a step measured both ways comes back twice)

A series is never dropped: only one of its two curves is. Every row keeps its `source`, so a
reader can always tell which curve it came from. `Run.metrics(prefer=...)`, `Run.transitions()`,
the reports, `compare` and the dashboard's metrics route all ask this function.
"""

from __future__ import annotations

from typing import Literal, Optional

import pandas as pd

Prefer = Optional[Literal["live", "checkpoint", "densest"]]
PREFERENCES = ("live", "checkpoint", "densest", None)
SOURCES = ("live", "checkpoint")
SERIES = ["probe", "metric", "layer", "head"]


def prefer_source(rows: pd.DataFrame, prefer: Prefer) -> pd.DataFrame:
    """The rows of `rows` (a metrics frame with a `source` column) that `prefer` reads, in their order."""
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {', '.join(map(repr, PREFERENCES))}, got {prefer!r}")
    if prefer is None or rows.empty or rows["source"].nunique() < 2:
        return rows
    frame = rows[SERIES + ["source", "step"]].copy()
    frame[["layer", "head"]] = frame[["layer", "head"]].astype("float").fillna(-1)  # a per-model series is one key
    counts = frame.groupby(SERIES + ["source"])["step"].nunique().unstack("source", fill_value=0)  # (series, source)
    live = counts["live"] if "live" in counts else 0 * counts.iloc[:, 0]
    checkpoint = counts["checkpoint"] if "checkpoint" in counts else 0 * counts.iloc[:, 0]
    if prefer == "densest":
        chosen = (live > checkpoint).map({True: "live", False: "checkpoint"})
    elif prefer == "live":
        chosen = (live > 0).map({True: "live", False: "checkpoint"})
    else:
        chosen = (checkpoint > 0).map({True: "checkpoint", False: "live"})
    wanted = chosen.reindex(pd.MultiIndex.from_frame(frame[SERIES])).to_numpy()  # (n,) the source each row's series reads
    return rows[frame["source"].to_numpy() == wanted]
