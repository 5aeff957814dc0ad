"""The docs name the metrics phaselens writes under the names it writes them (docs/tutorials/llc.md and the rest)."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
SOURCE = Path(__file__).resolve().parents[1] / "src" / "phaselens"


def test_the_llc_error_is_llc_se_on_every_page_and_llc_std_only_as_the_older_name():
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        if "`llc_std`" not in text:
            continue
        assert "`llc_se`" in text, f"{page.name} names `llc_std` but not `llc_se`, the LLC's standard error"
        for sentence in re.split(r"(?<=[.;])\s", text):
            if "`llc_std`" in sentence:
                assert re.search(r"older|kept|still", sentence), f"{page.name} gives `llc_std` as a current metric: {sentence!r}"


def test_every_metric_a_docs_example_asks_for_is_one_a_probe_writes():
    written = set(re.findall(r'"([a-z][a-z0-9_]*)"', "\n".join(p.read_text() for p in SOURCE.rglob("*.py"))))
    asked = {(page.name, name) for page in DOCS.rglob("*.md") for name in re.findall(r'metric="([a-z0-9_]+)"', page.read_text())}
    assert asked, "the docs' examples no longer read metrics by name: this test reads nothing"
    assert not [f"{page}: metric={name!r}" for page, name in sorted(asked) if name not in written]
