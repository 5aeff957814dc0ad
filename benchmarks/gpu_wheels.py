"""Fetch, into .whl/, the wheels the GPU machine needs to run phaselens and benchmarks/gpu.sh.

    .venv/bin/python benchmarks/gpu_wheels.py        # here (PyPI reachable); the GPU machine reaches nothing

The lent GPU machine has Python 3.12 with CUDA PyTorch, transformers, numpy, pandas and more
(benchmarks/gpu_image.txt, as the device tool's KINDS.md lists them) but not phaselens's other
requirements. This walks phaselens's requirements in this venv, leaves out torch and what the image
holds, and downloads each remaining one at this venv's version as a manylinux / pure-Python wheel for
CPython 3.12 without its dependencies (they are walked here). `.whl/` is git-ignored; gpu.sh installs it.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
WHEELS = HERE.parent / ".whl"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
ROOTS = ("phaselens", "httpx")  # httpx: the dashboard check's client
EXTRAS = {"uvicorn": {"standard"}}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(roots=ROOTS) -> dict[str, str]:
    """Every distribution `roots` need in this venv (markers evaluated here), name → version."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if norm(name) in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[norm(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            extras = EXTRAS.get(norm(name), set()) | {""}
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
                todo.append(req.name)
    return seen


def image_packages() -> set[str]:
    text = (HERE / "gpu_image.txt").read_text()
    return {norm(n) for n in re.split(r"[,\s]+", text) if n and not n.startswith("#")}


def main() -> int:
    missing = {n: v for n, v in requirements().items() if n not in image_packages() | {"phaselens", "torch"}}
    WHEELS.mkdir(exist_ok=True)
    failed = []
    for name, version in sorted(missing.items()):
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platform_args,
               "-d", str(WHEELS), f"{name}=={version}"]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            failed.append(f"{name}=={version}")
    size = sum(f.stat().st_size for f in WHEELS.glob("*.whl")) / 2**20
    print(f"{len(missing) - len(failed)} wheels in {WHEELS} ({size:.1f} MiB)")
    if failed:
        print("no wheel for: " + ", ".join(failed) + " (gpu.sh runs without them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
