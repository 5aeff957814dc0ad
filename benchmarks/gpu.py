"""phaselens's CUDA paths and their speed next to the CPU, in one run (benchmarks/gpu.sh starts it on the GPU machine).

    python benchmarks/gpu.py --work /tmp/gpu [--device cuda] [--quick]

Each case runs a phaselens command as a user types it, once on `--device` and once on the CPU, and prints
`case: device_s cpu_s ratio` plus what it checks (the demo's induction transition found on CUDA, bf16 head
scores within 0.05 of float32, every probe's rows present, the dashboard's model calls answering):

- train:     the demo (`phaselens train induction`) with live telemetry and checkpoints;
- report:    `phaselens report` on the CUDA run (the story must name the induction transition);
- sweep:     `phaselens probe` over every checkpoint, float32 and bfloat16 on the device, float32 on the CPU;
- llc:       the llc probe on three checkpoints;
- circuits:  the circuits probe (exact, EAP, EAP-IG) on three checkpoints, and `benchmarks/circuits.py` on the device;
- series:    `phaselens import-hf` of a locally saved GPT-NeoX series, probed on import;
- dashboard: `phaselens serve` and 20 timed calls each of /api/model/ablate and /api/model/patch.

The last line is JSON: {"benchmark": "gpu", "device": ..., "cases": {case: {"device_s", "cpu_s", "ratio"}}, "checks": {...}}.
`--quick` trains 600 steps instead of 3,000 (a dry run of the script on a CPU-only machine: `--device cpu --quick`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PY = [sys.executable, "-m", "phaselens"]
CHECKPOINTS = "1000,2000,3000"


def phaselens(*args: str, log: Path) -> float:
    """Run one phaselens command, its output appended to `log`; seconds it took (raises on failure)."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ phaselens {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([*PY, *args], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    if done.returncode:
        raise SystemExit(f"phaselens {' '.join(args)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def case(results: dict, name: str, device_s: float, cpu_s: float) -> None:
    results[name] = {"device_s": round(device_s, 2), "cpu_s": round(cpu_s, 2), "ratio": round(cpu_s / device_s, 2)}
    print(f"{name}: device {device_s:.1f} s, cpu {cpu_s:.1f} s, cpu/device {cpu_s / device_s:.2f}", flush=True)


def head_scores(run: Path):
    import phaselens as pl

    frame = pl.open_run(run).metrics(probe="heads")
    return frame.set_index(["step", "metric", "layer", "head"])["value"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_calls(run: Path, device: str, log: Path, calls: int = 20) -> float:
    """Median seconds of an ablate + a patch call against `phaselens serve RUN --device DEVICE`."""
    import httpx

    port = free_port()
    with log.open("a") as out:
        server = subprocess.Popen([*PY, "serve", str(run), "--port", str(port), "--device", device],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}/api"
        for _ in range(120):
            try:
                runs = httpx.get(f"{base}/runs", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"the dashboard did not start on port {port}; see {log}")
        name = runs["runs"][0]["name"] if isinstance(runs, dict) else runs[0]["name"]
        text = " ".join(str(t % 50 + 2) for t in list(range(20)) * 2)
        corrupted = " ".join(str((t * 7) % 50 + 2) for t in range(20)) + " " + " ".join(str(t % 50 + 2) for t in range(20))
        ablate = {"run": name, "text": text, "nodes": [{"layer": 1, "head": 0}], "mode": "mean"}
        patch = {"run": name, "clean_text": text, "corrupted_text": corrupted, "hook": "head", "layer": 1, "head": 0}
        times = []
        with httpx.Client(timeout=60) as client:
            for i in range(calls + 2):  # two warm-up rounds (model load, CUDA context)
                start = time.perf_counter()
                for route, body in (("ablate", ablate), ("patch", patch)):
                    response = client.post(f"{base}/model/{route}", json=body)
                    if response.status_code != 200:
                        raise SystemExit(f"/api/model/{route} answered {response.status_code}: {response.text[:300]}")
                if i >= 2:
                    times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="600 training steps (a dry run)")
    args = parser.parse_args()
    import torch

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "commands.log"
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"torch {torch.__version__}, device {args.device} ({name}), {os.cpu_count()} CPUs", flush=True)
    steps = ["train.steps=600", "train.checkpoint_every=100"] if args.quick else []
    checkpoints = "200,400,600" if args.quick else CHECKPOINTS
    results: dict = {}
    checks: dict = {}

    dev, cpu = work / "demo_device", work / "demo_cpu"
    case(results, "train", phaselens("train", "induction", f"train.device={args.device}", *steps, "--out", str(dev), log=log),
         phaselens("train", "induction", "train.device=cpu", *steps, "--out", str(cpu), log=log))
    phaselens("report", str(dev), log=log)
    story = (dev / "report" / "report.md").read_text()
    checks["report_names_the_induction_transition"] = "Induction transition at step" in story

    sweeps = {kind: work / f"sweep_{kind}" for kind in ("fp32", "bf16", "cpu")}
    for path in sweeps.values():
        shutil.copytree(dev, path)
    fp32 = phaselens("probe", str(sweeps["fp32"]), "--device", args.device, log=log)
    bf16 = phaselens("probe", str(sweeps["bf16"]), "--device", args.device, "--dtype", "bfloat16", log=log)
    case(results, "sweep", fp32, phaselens("probe", str(sweeps["cpu"]), "--device", "cpu", log=log))
    results["sweep_bf16"] = {"device_s": round(bf16, 2), "fp32_over_bf16": round(fp32 / bf16, 2)}
    gap = (head_scores(sweeps["bf16"]) - head_scores(sweeps["fp32"])).abs()
    checks["bf16_head_scores_max_abs_diff"] = round(float(gap.max()), 4)
    checks["bf16_within_0.05_of_fp32"] = bool(gap.max() < 0.05)

    for probe in ("llc", "circuits"):
        a, b = work / f"{probe}_device", work / f"{probe}_cpu"
        shutil.copytree(dev, a)
        shutil.copytree(dev, b)
        case(results, probe,
             phaselens("probe", str(a), "--probes", probe, "--steps", checkpoints, "--device", args.device, log=log),
             phaselens("probe", str(b), "--probes", probe, "--steps", checkpoints, "--device", "cpu", log=log))
        import phaselens as pl

        rows = pl.open_run(a).metrics(probe=probe)
        checks[f"{probe}_rows_on_device"] = int(len(rows))
    # benchmarks/circuits.py on the device: exact patching of every edge against EAP and EAP-IG, on the demo and 1,519 edges
    bench = subprocess.run([sys.executable, str(Path(__file__).with_name("circuits.py")), "--run", str(dev), "--device", args.device,
                            *(["--quick"] if args.quick else [])], capture_output=True, text=True, check=True)
    with log.open("a") as out:
        out.write(bench.stdout)
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    results["circuits_benchmark"] = {k: figures[k] for k in ("exact_s", "eap_s", "eap_ig_s", "ratio_exact_vs_eap", "edges")}

    from phaselens.series.toy import save_toy_series

    series = save_toy_series(work / "toy_series", "the quick brown fox jumps over the lazy dog. " * 400,
                             steps=(0, 50, 100, 200, 400), d_model=64, n_layers=2, n_heads=4)
    case(results, "series",
         phaselens("import-hf", str(series), "--revisions", "all", "--out", str(work / "series_device"),
                   "--device", args.device, log=log),
         phaselens("import-hf", str(series), "--revisions", "all", "--out", str(work / "series_cpu"),
                   "--device", "cpu", log=log))

    case(results, "dashboard", dashboard_calls(dev, args.device, log), dashboard_calls(dev, "cpu", log))
    checks["dashboard_answers"] = True
    print(json.dumps({"benchmark": "gpu", "device": name, "torch": torch.__version__, "cases": results, "checks": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
