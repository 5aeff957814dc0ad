"""The circuit view in a real browser: it follows the step scrubber, and clicking an edge patches it live and
shows the metric change, the same number the API gives. The screenshot goes to test-output/."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from phaselens.server.app import create_app
from phaselens.server.session import Session
from test_dashboard_circuits import measured_copy

IDLE = "document.body.dataset.busy === '0'"

pytestmark = pytest.mark.slow


def test_the_circuit_follows_the_scrubber_and_a_clicked_edge_shows_its_live_metric_change(
        browser, open_dashboard, induction_run, tmp_path, screenshots):
    path = measured_copy(induction_run, tmp_path)
    with open_dashboard(browser, run=[path]) as page:
        page.wait_for_selector("#circuits-view:not([hidden]) #circuit-graph .edge")
        assert page.get_attribute("#circuit-graph", "data-step") == "20"
        assert page.locator("#circuit-graph .edge").count() == 29
        assert page.locator("#circuit-graph .cnode").count() == 6  # embed, 4 heads, logits
        assert page.locator("#circuit-method option").all_text_contents() == ["exact", "eap", "eap_ig"]

        page.evaluate("""() => { const s = document.getElementById('step-slider');
            s.value = 1; s.dispatchEvent(new Event('input')); }""")  # checkpoints 0, 10, 20: scrub to 10
        page.wait_for_function(f"document.getElementById('circuit-graph').dataset.step === '10' && {IDLE}")
        assert "step 10" in page.inner_text("#circuit-summary")

        # the strongest edge is drawn last, on top of the others: click it where it is drawn
        edges = page.eval_on_selector_all("#circuit-graph .edge", "gs => gs.map(g => [g.dataset.edge, Number(g.dataset.score)])")
        edge = max(edges, key=lambda pair: abs(pair[1]))[0]
        page.locator(f"#circuit-graph .edge[data-edge='{edge}'] .hit").click()
        page.wait_for_function("document.getElementById('circuit-patch-result').dataset.seq === '1'")
        result = page.locator("#circuit-patch-result")
        assert result.get_attribute("data-edge") == edge
        shown = float(result.get_attribute("data-change"))
        assert edge in result.inner_text() and "change" in result.inner_text() and "stored scores: exact" in result.inner_text()
        assert page.locator(f"#circuit-graph .edge.selected[data-edge='{edge}']").count() == 1
        page.locator("#circuits-view").screenshot(path=str(screenshots / "dashboard_circuits.png"))
        assert page.locator("#error-bar").is_hidden() and not page.errors

    api = TestClient(create_app(Session([path]), local_only=False))
    answer = api.post("/api/circuits/patch", json={"run": path.name, "step": 10, "edge": edge}).json()
    assert shown == pytest.approx(answer["change"], abs=1e-9)
    assert shown == pytest.approx(answer["stored"]["exact"], abs=1e-5)
