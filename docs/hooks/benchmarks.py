"""mkdocs hook: benchmark tables generated from benchmarks/results/*.json at build time.

`<!-- benchmark: NAME -->` in a page becomes a table of what `benchmarks/record.py NAME` last saved:
every figure of the benchmark's JSON line, with the date, the CPU, the core count and the load
average before and after the run. A benchmark that has not been recorded says how to record it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
MARKER = re.compile(r"<!-- benchmark: ([a-z0-9_]+) -->")


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return str(value)


def result_table(name: str, results: Path = RESULTS) -> str:
    """A Markdown table of the recorded result of benchmark `name`, with its provenance."""
    path = results / f"{name}.json"
    if not path.is_file():
        return (f"*Not recorded yet:* `.venv/bin/python benchmarks/record.py {name}` writes "
                f"`benchmarks/results/{name}.json`, and the next `make docs` shows it here.")
    entry = json.loads(path.read_text())
    figures = {k: v for k, v in entry["result"].items() if k != "benchmark"}
    rows = ["| figure | value |", "|---|---|"]
    rows += [f"| `{key}` | {_value(value)} |" for key, value in figures.items()]
    load = (f"{entry['load_before'][0]:.2f} before, {entry['load_after'][0]:.2f} after "
            "(1-minute load average)")
    args = " ".join(entry.get("args") or []) or "(defaults)"
    provenance = (f"Recorded {entry['date']} on {entry['cpu']} ({entry['cores']} cores), load {load}; "
                  f"arguments: `{args}`; {entry['wall_s']} s in all.")
    return "\n".join(rows) + "\n\n" + provenance


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    return MARKER.sub(lambda m: result_table(m.group(1)), markdown)


def on_serve(server, config, builder, **kwargs):
    server.watch(str(RESULTS))
    return server
