"""Run one benchmark and save its result with the machine and load it was measured on.

    .venv/bin/python benchmarks/record.py NAME [ARGS ...]

runs `benchmarks/NAME.py ARGS`, takes the JSON object on its last line of output and writes
`benchmarks/results/NAME.json`: the result, the arguments, the date (UTC), the CPU model, the core
count and the load average (`os.getloadavg()`) before and after. The docs' benchmark tables are
built from these files (docs/hooks/benchmarks.py), so no measured figure is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("PHASELENS_BENCH_RESULTS") or HERE / "results")  # the env var: a scratch folder (tests)


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_json_line(output: str) -> dict:
    """The JSON object on the last non-empty line of a benchmark's output."""
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        raise SystemExit("record: the benchmark printed nothing")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise SystemExit(f"record: the benchmark's last line is not JSON: {lines[-1][:200]}") from None
    if not isinstance(result, dict):
        raise SystemExit("record: the benchmark's last line is JSON but not an object")
    return result


def record(name: str, args: list[str], bench_dir: Path = HERE, results_dir: Path = RESULTS) -> Path:
    """Run `bench_dir/NAME.py ARGS` and write `results_dir/NAME.json`; returns that path."""
    script = bench_dir / f"{name}.py"
    if not script.is_file():
        known = sorted(p.stem for p in bench_dir.glob("*.py") if p.stem not in {"record", "interleaved"})
        raise SystemExit(f"record: no benchmark {name!r} (benchmarks: {', '.join(known)})")
    load_before = os.getloadavg()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), *args], cwd=bench_dir.parent, capture_output=True, text=True)
    seconds = time.monotonic() - started
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"record: {script.name} exited with status {proc.returncode}")
    result = last_json_line(proc.stdout)
    load_after = os.getloadavg()
    entry = {
        "benchmark": name,
        "args": args,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "wall_s": round(seconds, 1),
        "result": result,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(entry, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="benchmark to run: benchmarks/NAME.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    options = parser.parse_args()
    path = record(options.name, options.args)
    print(f"saved {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
