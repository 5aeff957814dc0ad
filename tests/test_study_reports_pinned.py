"""The built-in studies report and measure exactly what they did before studies became plug-ins.

Short real runs of each study (induction, late disambiguation with and without a selector, byte-level
text) are trained, swept with the default post-hoc probes and reported; the post-hoc values and the
report text are compared with snapshots taken from the code before the refactor (tests/golden/).
Run paths are written as RUN, the text file as TEXT; the configuration table is left out.

A training run is bit-identical on one machine, not across CPUs, so nothing here asks for another machine's digits: the
report must have the golden's structure (every line, with its numbers masked, exactly) and each printed number within
one unit of its last printed digit of the golden's (a rounding that tips over on another CPU); post-hoc values within a
relative 1e-4 (gradients perturbed by a relative 1e-4 at every step of these 20-step runs move them by under 3e-6, and
a broken measurement far more). To take new snapshots after an intended change:
`PHASELENS_UPDATE_GOLDEN=1 pytest tests/test_study_reports_pinned.py` and review the diff.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from phaselens.posthoc.runner import run_probes
from phaselens.report import write_report
from phaselens.run import open_run
from phaselens.training.config import load_config
from phaselens.training.trainer import train

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PHASELENS_UPDATE_GOLDEN") == "1"
TEXT = "\n".join(f"{speaker}:\nThe {n}th line of a short play, said {n % 7} times over.\n"
                 for n, speaker in zip(range(120), ["ANNA", "BORIS", "CLARA"] * 40))
TINY_TEXT_MODEL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_mlp=64", "model.n_ctx=32",
                   "data.corpus=", "data.probe_size=8", "data.eval_size=8", "train.batch_size=8", "train.steps=10",
                   "train.checkpoint_every=5", "train.eval_every=5", "telemetry.every=2", "telemetry.checkpoint_probes=[neurons]"]


def _post_hoc_values(path: Path) -> list[list]:
    rows = open_run(path).metrics(source="checkpoint").sort_values(["step", "probe", "metric", "layer", "head"])
    index = lambda value: None if pd.isna(value) else int(value)  # noqa: E731
    return [[int(r.step), r.probe, r.metric, index(r.layer), index(r.head), None if math.isnan(r.value) else float(r.value)]
            for r in rows.itertuples(index=False)]


def _report_text(path: Path, text_file: Path | None = None) -> str:
    """report.md without the configuration table (every run has one; it grows with every new config key)."""
    text = write_report(path).read_text().replace(str(path), "RUN")
    text = re.sub(r"## Configuration\n\n.*?\n\n(?=## )", "## Configuration\n\n(table)\n\n", text, flags=re.S)
    return text.replace(str(text_file), "TEXT") if text_file else text


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _structure(report: str) -> list[str]:
    """The report's lines with every number masked: headings, sentences and table rows as the golden has them."""
    return [NUMBER.sub("#", line) for line in report.splitlines()]


def _same_number(got: str, want: str) -> bool:
    """A printed number as the golden prints it: a count or step exactly; a measured value (it has decimals) within
    one unit of its last printed digit, where another CPU's last bits may tip the rounding."""
    if "." not in want:
        return got == want
    unit = 10.0 ** -len(want.split(".")[1])
    return abs(float(got) - float(want)) <= unit * (1 + 1e-6)


def _figures(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "report").glob("*.png"))


def _check(name: str, value) -> None:
    file = GOLDEN / f"{name}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        file.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    expected = json.loads(file.read_text())
    assert value["figures"] == expected["figures"]
    assert _structure(value["report"]) == _structure(expected["report"])
    for got_line, want_line in zip(value["report"].splitlines(), expected["report"].splitlines()):
        got_numbers, want_numbers = NUMBER.findall(got_line), NUMBER.findall(want_line)
        assert all(map(_same_number, got_numbers, want_numbers)), (got_line, want_line)
    got, want = value["post_hoc"], expected["post_hoc"]
    assert [row[:5] for row in got] == [row[:5] for row in want], "the post-hoc probes wrote other rows"
    for g, w in zip(got, want):
        assert (g[5] is None) == (w[5] is None) and (w[5] is None or math.isclose(g[5], w[5], rel_tol=1e-4, abs_tol=1e-6)), (g, w)


def _study(path: Path, text_file: Path | None = None) -> dict:
    result = run_probes(path, progress=False)
    assert result.ok, result.failures
    return {"post_hoc": _post_hoc_values(path), "report": _report_text(path, text_file), "figures": _figures(path)}


def test_induction_study_reports_and_measures_as_before(induction_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(induction_run, path)
    _check("induction", _study(path))


@pytest.mark.parametrize("task", ["bz_to_a", "b_to_a"])
def test_disambiguation_study_reports_and_measures_as_before(task, tmp_path):
    path = tmp_path / "run"
    train(load_config("disamb_small", [f"data.task={task}", "data.k=4", "data.n_unique_b=20", "train.steps=20",
                                       "train.checkpoint_every=10", "data.probe_size=16", "data.eval_size=16"]), path, progress=False)
    _check(f"disambiguation_{task}", _study(path))


def test_text_study_reports_and_measures_as_before(tmp_path):
    text_file = tmp_path / "play.txt"
    text_file.write_text(TEXT)
    path = tmp_path / "run"
    train(load_config("gpt_shakespeare", [*TINY_TEXT_MODEL, f"data.path={text_file}"]), path, progress=False)
    _check("text", _study(path, text_file))
