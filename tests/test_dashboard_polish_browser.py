"""The dashboard's finish in a real browser (Debian's headless Chromium driven by Playwright): the notebook-model
notice stays hidden on a run page, every plot titles its axes, transitions and stages are told apart in a legend,
patching takes an answer and a wrong token, and a run with an induction batch opens on one of its sequences.
Screenshots go to test-output/ and /tmp/notes/shots/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import phaselens as pl

pytestmark = pytest.mark.slow  # a browser and the 3,000-step demo run

IDLE = "document.body.dataset.busy === '0'"  # no request or redraw in flight
SHOTS = Path("/tmp/notes/shots")


def shoot(locator, screenshots: Path, name: str) -> None:
    """A screenshot in test-output/ (kept by CI) and beside the lead's note."""
    locator.screenshot(path=str(screenshots / f"{name}.png"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshots / f"{name}.png", SHOTS / f"{name}.png")


@pytest.fixture(scope="module")
def page(browser, open_dashboard, induction_run, induced_run, imported_run):
    with open_dashboard(browser, run=[induction_run, induced_run, imported_run]) as page:
        yield page


def show(page, run: Path) -> None:
    page.select_option("#run-select", run.name)
    page.wait_for_function(f"window.phaselens.run === '{run.name}' && {IDLE}")


def test_the_notebook_model_notice_is_hidden_on_a_run_page(page, induction_run):
    show(page, induction_run)
    assert page.locator("#kernel-toggle").get_attribute("hidden") is not None
    assert page.locator("#kernel-toggle").is_hidden()  # no CSS rule shows it over its `hidden` attribute


def test_every_drawn_plot_titles_its_y_axis(page, induction_run, screenshots):
    show(page, induction_run)
    page.click("#arch [data-node='L1H0']")
    page.wait_for_function(IDLE)
    page.click("#grad-btn")
    page.wait_for_function(f"document.querySelector('#grad-plot .main-svg') && {IDLE}")
    plots = page.eval_on_selector_all(".plot", """nodes => nodes.filter((n) => n.querySelector('.main-svg') && !n.hidden)
        .map((n) => [n.id, [...n.querySelectorAll('.g-ytitle, .g-y2title')].map((t) => t.textContent.trim()).filter(Boolean)])""")
    drawn = {name for name, _ in plots}
    assert {"timeline-plot", "heatmap-plot", "loss-plot", "attention-plot", "qk-plot", "ov-plot", "grad-plot"} <= drawn, drawn
    untitled = [name for name, titles in plots if not titles]
    assert untitled == [], plots
    titles = dict(plots)
    assert titles["timeline-plot"] == ["cross-entropy (nats)"]  # loss/copy: its unit
    assert titles["loss-plot"] == ["cross-entropy (nats)"]
    shoot(page.locator("#model-view"), screenshots, "dashboard_axis_titles")
    assert page.errors == []


def test_transition_windows_are_outlined_and_named_in_the_legend(page, induced_run, screenshots):
    show(page, induced_run)
    layout = page.evaluate("""() => { const p = document.getElementById('timeline-plot');
        return { shapes: p.layout.shapes.map((s) => ({ name: s.name || '', type: s.type, line: s.line || {} })),
                 legend: p.data.map((t) => t.name) }; }""")
    windows = [s for s in layout["shapes"] if s["name"] == "transition window"]
    assert windows, layout["shapes"]  # the demo's copy loss has its transition near step 1,100
    assert all(s["type"] == "rect" and s["line"].get("width", 0) > 0 for s in windows)  # outlined, unlike a stage band
    assert "detected transition (window, step dashed)" in layout["legend"]
    assert page.locator("#timeline-plot .legendtext", has_text="detected transition").count() == 1
    shoot(page.locator("#timeline-view"), screenshots, "dashboard_transition_legend")


def test_patching_toward_a_chosen_answer_and_wrong_token(page, induction_run, screenshots):
    show(page, induction_run)
    clean = [int(t) for t in page.input_value("#patch-clean").split()]
    answer, wrong = clean[1], clean[2]
    assert answer != wrong
    page.select_option("#patch-hook", "resid_pre")
    page.fill("#patch-layer", "1")
    page.fill("#patch-answer", str(answer))
    page.fill("#patch-wrong", str(wrong))
    page.click("#patch-btn")
    page.wait_for_function(f"document.getElementById('patch-result').dataset.seq === '1' && {IDLE}")
    result = page.locator("#patch-result")
    assert (int(result.get_attribute("data-answer")), int(result.get_attribute("data-wrong"))) == (answer, wrong)
    assert f"logit({answer}:" in result.inner_text() and f"logit({wrong}:" in result.inner_text()
    # Patching every position of the residual stream entering layer 1 carries the clean run over: all of it recovered.
    assert "recovered 100.0%" in result.inner_text(), result.inner_text()
    shoot(page.locator("#patch-result").locator("xpath=.."), screenshots, "dashboard_patch_answer_wrong")

    for bad, message in ((99999, "answer token 99999 is outside the vocabulary"), (-1, "answer: Input should be greater than or equal to 0")):
        page.fill("#patch-answer", str(bad))
        page.click("#patch-btn")
        page.wait_for_function(IDLE)
        assert page.locator("#error-bar").is_visible() and message in page.inner_text("#error-bar")
    page.fill("#patch-answer", "")  # empty: the clean run's top prediction again
    page.fill("#patch-wrong", "")
    page.click("#patch-btn")
    page.wait_for_function(f"document.getElementById('patch-result').dataset.seq === '2' && {IDLE}")
    assert page.locator("#error-bar").is_hidden() and page.errors == []


def test_an_imported_series_opens_on_its_induction_batch_with_the_copy_positions_marked(page, imported_run, screenshots):
    show(page, imported_run)
    batch = pl.open_run(imported_run).probe_batches()["induction"]
    sample = page.evaluate("() => window.phaselens.sample")
    assert sample["origin"] == "induction batch" and sample["tokens"] == batch.tokens[0].tolist()
    assert sample["copy_positions"] == batch.positions["copy"][0].tolist() and any(sample["copy_positions"])
    assert page.input_value("#text-input") == sample["text"]
    assert "induction batch" in page.inner_text("#sample-note") and "copy a repeated segment" in page.inner_text("#sample-note")
    copy_loss = page.locator("#copy-loss")
    assert copy_loss.inner_text() != "no repeats" and float(copy_loss.get_attribute("data-value")) > 0
    page.click("#arch [data-node='L1H0']")
    page.wait_for_function(f"document.querySelector('#attention-plot .main-svg') && {IDLE}")
    shoot(page.locator("#model-view"), screenshots, "dashboard_imported_induction_text")
    assert page.locator("#error-bar").is_hidden() and page.errors == []


def test_whole_run_views_are_computed_once_per_change_of_the_run(run_copy, monkeypatch):
    """Series, transitions and stages read the whole run: the page's loads reuse them until the run writes again."""
    from fastapi.testclient import TestClient

    from phaselens.server import routes
    from phaselens.server.app import create_app
    from phaselens.server.session import Session
    from phaselens.store.metrics import MetricsStore

    computed = []
    real = routes._transitions
    monkeypatch.setattr(routes, "_transitions", lambda session, run: computed.append(run) or real(session, run))
    session = Session([run_copy])
    client = TestClient(create_app(session), base_url="http://127.0.0.1")
    for _ in range(3):
        for view in ("transitions", "stages", "series"):
            assert client.get(f"/api/runs/{run_copy.name}/{view}").status_code == 200
    assert computed == [run_copy.name]
    series = client.get(f"/api/runs/{run_copy.name}/series").json()["series"]
    assert not any(s["probe"] == "extra" for s in series)

    store = MetricsStore(run_copy / "metrics.sqlite")
    store.write([(20, "extra", "value", None, None, 1.0, "checkpoint")])  # the run writes: the views follow
    store.close()
    assert any(s["probe"] == "extra" for s in client.get(f"/api/runs/{run_copy.name}/series").json()["series"])
    client.get(f"/api/runs/{run_copy.name}/transitions")
    assert computed == [run_copy.name] * 2
