"""The run's unigram: token counts of its training data, in `unigram.json` (torch-free).

    {"counts": [c_0, c_1, ...], "tokens": N, "source": "how they were counted"}

The `geometry` probe turns them into p_unigram for `kl_unigram`. A user may put their own
counts there (a JSON list, index = token id, is read too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from phaselens.store.atomic import read_json, write_json

UNIGRAM_FILE = "unigram.json"


def unigram_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / UNIGRAM_FILE


def write_unigram_counts(path: Path | str, counts: Sequence[float], source: str) -> None:
    counts = [int(c) if float(c).is_integer() else float(c) for c in counts]
    write_json(Path(path), {"counts": counts, "tokens": sum(counts), "source": source})


def read_unigram_counts(path: Path | str) -> list[float]:
    """Token counts from a JSON file: a list of counts, or an object with a "counts" list."""
    path = Path(path)
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read unigram counts from {path}: {exc}") from exc
    counts = data.get("counts") if isinstance(data, dict) else data
    if (not isinstance(counts, list) or not counts
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise ValueError(f"{path}: expected a JSON list of token counts >= 0 (index = token id), or {{\"counts\": [...]}}")
    return counts
