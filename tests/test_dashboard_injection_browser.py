"""Script injection through the data a dashboard shows (issue 27, case 1), in a real browser: a run
whose directory is named like an HTML tag and a probe with such a name are shown as text, and no
script in them runs, whether the page just opened or the user picked them."""

from __future__ import annotations

import shutil

import pytest

from phaselens.store.metrics import MetricsStore

IDLE = "document.body.dataset.busy === '0'"

pytestmark = pytest.mark.slow  # a browser: several seconds

# Each payload, if the page parses it as HTML, marks the window and renames the page.
RUN_NAME = "<img src=x onerror=\"window.__pwned='run';document.title='pwned'\">"
PROBE = "<img src=x onerror=\"window.__pwned='probe';document.title='pwned'\">"
CLOSING = "</option></select><img src=x onerror=\"window.__pwned='closing'\">"


@pytest.fixture
def hostile_run(induction_run, tmp_path):
    """A copy of the induction run in a directory named like a tag, with two hostile probes in its metrics."""
    path = tmp_path / RUN_NAME
    shutil.copytree(induction_run, path)
    store = MetricsStore(path / "metrics.sqlite")
    store.write([(step, name, "entropy", layer, head, 0.5 + 0.01 * step, "live")
                 for name in (PROBE, CLOSING) for step in (0, 10, 20) for layer in (0, 1) for head in (0, 1)])
    store.close()
    return path


def pwned(page) -> object:
    return page.evaluate("window.__pwned ?? null")


def test_a_hostile_run_name_and_probe_name_show_as_text_and_run_no_script(browser, open_dashboard, hostile_run):
    with open_dashboard(browser, run=[hostile_run]) as page:
        page.wait_for_timeout(300)  # an <img onerror> fires once its (failing) load ends
        assert pwned(page) is None and page.title() == "phaselens dashboard"
        assert page.locator("#runs-table tbody td").first.text_content() == RUN_NAME
        assert page.eval_on_selector("#run-select", "s => [...s.options].map(o => [o.value, o.text])") == [[RUN_NAME, RUN_NAME]]
        assert page.locator("#runs-table img, header img, #timeline-view img").count() == 0
        assert page.locator("#timeline-plot .main-svg").count() > 0  # the page still draws under its Content-Security-Policy
        page.evaluate("window.__violations = []; document.addEventListener('securitypolicyviolation', "
                      "(e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI))")
        names = page.eval_on_selector("#metric-select", "s => [...s.options].map(o => o.text)")
        assert f"{PROBE}/entropy" in names and f"{CLOSING}/entropy" in names
        for shown in (f"{PROBE}/entropy", f"{CLOSING}/entropy"):  # picked by the user: title, legend and heatmap
            page.select_option("#metric-select", shown)
            page.select_option("#heatmap-select", shown)
            page.wait_for_function(IDLE)
            page.wait_for_timeout(300)
            assert pwned(page) is None and page.title() == "phaselens dashboard"
            for plot in ("#timeline-plot", "#heatmap-plot"):  # plotly drew the name as text, not as markup it drops
                assert shown.split("/entropy")[0] in page.locator(f"{plot} .gtitle").text_content()
        page.select_option("#compare-select", RUN_NAME)  # the run's name in the legend of the comparison
        page.wait_for_function(IDLE)
        page.wait_for_timeout(300)
        assert pwned(page) is None and page.title() == "phaselens dashboard"
        assert page.errors == [] and page.evaluate("window.__violations") == []


def test_the_page_works_under_its_own_content_security_policy(browser, induction_run):
    """The second wall: the page draws its plots with no inline script and no eval (nothing the policy blocks)."""
    import time

    import phaselens as pl

    handle = pl.serve(run=[induction_run])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # no bypass: the policy applies
    try:
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.add_init_script("window.__violations = []; document.addEventListener('securitypolicyviolation', "
                             "(e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI))")
        response = page.goto(handle.url)
        assert "script-src 'self'" in response.headers["content-security-policy"]

        def settle() -> None:  # polled from Python: Playwright's own string predicates would need eval
            deadline = time.monotonic() + 60
            while not page.evaluate("() => document.body.dataset.ready === '1' && document.body.dataset.busy === '0'"):
                assert time.monotonic() < deadline, "the dashboard did not finish loading"
                time.sleep(0.1)

        settle()
        page.select_option("#metric-select", "attention/entropy")
        settle()
        page.locator("#arch .node[data-layer='1']").first.click()  # the head panel: attention pattern and circuits
        settle()
        assert page.locator("#timeline-plot .main-svg").count() > 0 and page.locator("#attention-plot .main-svg").count() > 0
        assert errors == [] and page.evaluate("window.__violations") == [] and page.locator("#error-bar").is_hidden()
    finally:
        page.close()
        handle.stop()
