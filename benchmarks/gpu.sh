#!/usr/bin/env bash
# phaselens's CUDA paths on the lent GPU machine, in one call of under 8 minutes (benchmarks/gpu.py says what runs).
#
# Here first (PyPI is reachable here, not there):   .venv/bin/python benchmarks/gpu_wheels.py
# then, through the device tool, with carry [".whl"]:  bash benchmarks/gpu.sh
# Its log and JSON come back under $OUT (gpu.log, gpu.json, commands.log).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/phaselens-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu.py --work /tmp/phaselens-gpu "$@" 2>&1 | tee "$OUT/gpu.log"
tail -n 1 "$OUT/gpu.log" > "$OUT/gpu.json"
cp /tmp/phaselens-gpu/commands.log "$OUT/commands.log"
