"""Memory over an imported checkpoint series: peak RSS for 20 revisions against 2, side by side.

A local series of one GPT-NeoX model (d_model 512, 4 layers, a 16k-token padded vocabulary:
~75 MB of float32 weights per revision, each revision a fresh seeded initialisation) is
saved once. Then, each in its own child process, `import-hf` + `phaselens probe` (attention,
loss, logit_lens, geometry) run over its first 2 and over all 20 revisions, and the child's
peak resident memory is read. Revisions are booted one at a time and freed, so the peak
should not grow with the length of the series. The last line is JSON.

    .venv/bin/python benchmarks/geometry_import.py [--revisions 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import resource, sys, time
from phaselens.series import import_hf
from phaselens.posthoc.runner import run_probes
model_dir, out, text, revisions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
began = time.time()
import_hf(model_dir, out, revisions=revisions, text=text, seq_len=64, sequences=16)
result = run_probes(out, progress=False)
assert not result.failures, result.failures
print(time.time() - began, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(model_dir: Path, root: Path, text: Path, revisions: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child that imports and probes `revisions`."""
    out = Path(tempfile.mkdtemp(dir=root)) / "run"  # a fresh folder per child: import-hf refuses an existing run
    done = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(out), str(text), ",".join(revisions)],
                          check=True, capture_output=True, text=True)
    seconds, peak_kib = done.stdout.split()[-2:]
    return int(peak_kib) / 1024, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a d_model 64, 2-layer, 2k-vocabulary model: a smoke run, not a measurement")
    args = parser.parse_args()
    size = dict(d_model=64, n_layers=2, n_heads=4, d_vocab=2048) if args.quick else dict(d_model=512, n_layers=4, n_heads=8, d_vocab=16384)
    import torch

    from phaselens.series.toy import save_toy_series

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = [f"w{i}" for i in range(500)]
        text = root / "probe.txt"
        text.write_text("\n".join(" ".join(words[(7 * i + 3 * j) % 500] for j in range(12)) for i in range(400)))
        steps = [100 * i for i in range(args.revisions)]
        began = time.time()
        save_toy_series(root / "model", text.read_text(), steps=steps, train=False, seq_len=64, **size)
        print(f"saved {len(steps)} revisions in {time.time() - began:.0f} s")
        names = [f"step{s}" for s in steps]
        short_peak, short_s = measure(root / "model", root, text, names[:2])
        print(f"2 revisions: peak RSS {short_peak:.0f} MiB ({short_s:.1f} s)")
        long_peak, long_s = measure(root / "model", root, text, names) if len(names) > 2 else (short_peak, short_s)
        print(f"{len(names)} revisions: peak RSS {long_peak:.0f} MiB ({long_s:.1f} s)")
    ratio = long_peak / short_peak
    print(json.dumps({"benchmark": "geometry_import", "revisions": len(names), "peak_mib_2": round(short_peak),
                      f"peak_mib_{len(names)}": round(long_peak), "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
