"""The dashboard timeline in a real browser (Debian's headless Chromium driven by Playwright): the
developmental stages are drawn as bands behind the curves of a run the `llc` probe has measured,
and a run without LLC values has none."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # a browser: several seconds

IDLE = "document.body.dataset.busy === '0'"  # no request or redraw in flight
TINY_LLC = {"llc": {"chains": 2, "draws": 6, "burnin": 2, "batch_size": 4, "n": 32}}


@pytest.fixture(scope="module")
def measured_run(induction_run, tmp_path_factory):
    """A copy of the short induction run with the `llc` probe run on its checkpoints."""
    import shutil

    from phaselens.posthoc.runner import run_probes

    path = tmp_path_factory.mktemp("stages") / "measured"
    shutil.copytree(induction_run, path)
    assert run_probes(path, ["llc"], options=TINY_LLC, progress=False).ok
    return path


def test_timeline_draws_stage_bands_only_for_a_run_with_llc_values(browser, open_dashboard, induction_run, measured_run,
                                                                   screenshots):
    with open_dashboard(browser, run=[induction_run, measured_run]) as page:

        def show(run) -> tuple[list[dict], list[str], int]:
            """Open `run`; the timeline's stage bands (layout shapes), its stage labels, and the bands' drawn rectangles."""
            page.select_option("#run-select", run.name)
            page.wait_for_function(f"window.phaselens.run === '{run.name}' && {IDLE}")
            bands = page.evaluate("""() => (document.getElementById('timeline-plot').layout.shapes || [])
                .filter((s) => (s.name || '').startsWith('stage ')).map((s) => ({name: s.name, x0: s.x0, x1: s.x1}))""")
            labels = page.eval_on_selector_all("#timeline-plot .annotation-text", "nodes => nodes.map(n => n.textContent)")
            drawn = page.locator("#timeline-plot .layer-below .shapelayer path").count()
            return bands, labels, drawn

        stages = [(s["start"], s["end"]) for s in
                  page.evaluate(f"fetch('/api/runs/{measured_run.name}/stages').then((r) => r.json())")["stages"]]
        assert stages and stages[0][0] == 0 and stages[-1][1] == 20
        bands, labels, drawn = show(measured_run)
        page.screenshot(path=str(screenshots / "dashboard_stage_bands.png"), full_page=True)
        assert [(b["x0"], b["x1"]) for b in bands] == stages
        assert [b["name"] for b in bands] == [f"stage {i}" for i in range(1, len(stages) + 1)]
        assert [t for t in labels if t.startswith("stage ")] == [f"stage {i}" for i in range(1, len(stages) + 1)]
        assert drawn >= len(stages)
        legend = page.eval_on_selector_all("#timeline-plot .legendtext", "nodes => nodes.map(n => n.textContent)")
        assert "LLC stage (grey band)" in legend  # told apart from a transition window in the legend

        bands, labels, drawn = show(induction_run)  # no llc rows: no stages
        assert bands == [] and not any(t.startswith("stage ") for t in labels) and drawn == 0
        assert page.errors == []
