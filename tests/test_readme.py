"""The README's Python examples run as written (with fewer steps)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_for_telemetry_cache_metrics_and_a_custom_probe_run():
    blocks = python_blocks()
    loop = next(b for b in blocks if "pl.Telemetry(" in b).replace("range(200)", "range(6)")
    cache = next(b for b in blocks if "run_with_cache(batch.tokens)" in b)
    probe = next(b for b in blocks if "@pl.register_probe" in b)
    namespace: dict = {}
    exec(loop, namespace)
    frame = namespace["frame"]
    assert set(frame["probe"]) == {"attention", "heads", "loss"}
    assert sorted(frame["step"].unique()) == list(range(6))
    exec(cache, namespace)
    exec(probe, namespace)
    pl = namespace["pl"]
    model = namespace["model"]
    with pl.Telemetry(model, probes=["resid_norm"]) as telemetry:
        tokens = torch.randint(0, 64, (4, 64))
        with telemetry.step(0, tokens):
            model(tokens)
        rows = telemetry.dataframe()
    assert list(rows["metric"].unique()) == ["mean_norm"] and len(rows) == 2
    assert (rows["value"] > 0).all()
