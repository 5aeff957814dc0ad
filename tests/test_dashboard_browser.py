"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright): pick the run,
scrub to a checkpoint after the transition, click the layer-1 induction head, ablate it, and see
the copy-position loss rise. Screenshots go to test-output/ (CI keeps that folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

import phaselens as pl

IDLE = "document.body.dataset.busy === '0'"  # no request or redraw in flight

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A tiny byte-level transformer with MLPs on the Shakespeare corpus, and the neuron report
    `phaselens neurons` wrote for it (RUN/artifacts/neurons/step_00000010.json)."""
    from phaselens.analysis.neurons import neurons_report
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    tiny = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_mlp=64", "model.n_ctx=32", "train.steps=10",
            "train.batch_size=8", "train.checkpoint_every=10", "train.eval_every=10", "train.warmup=0", "train.threads=1",
            "telemetry.every=5", "data.probe_size=8", "data.eval_size=8", "name=text"]
    path = tmp_path_factory.mktemp("text") / "text"
    train(load_config("gpt_shakespeare", tiny), path, progress=False)
    neurons_report(path, n_tokens=4096, top_k=4, window=24, progress=False)
    return path


@pytest.fixture(scope="module")
def page(browser, open_dashboard, induced_run, induction_run, text_run):
    with open_dashboard(browser, run=[induction_run, induced_run, text_run]) as page:
        yield page


def test_scrub_click_the_induction_head_ablate_it_and_the_copy_loss_rises(page, induced_run, screenshots):
    page.select_option("#run-select", induced_run.name)
    page.wait_for_function(f"window.phaselens.run === '{induced_run.name}' && {IDLE}")
    assert page.locator("#timeline-plot .main-svg").count() > 0
    assert page.locator("#runs-table tr.selected td").first.inner_text() == induced_run.name
    steps = pl.open_run(induced_run).checkpoint_steps()

    def scrub_to(step: int) -> list:
        page.evaluate(f"""() => {{ const s = document.getElementById('step-slider');
            s.value = {steps.index(step)}; s.dispatchEvent(new Event('input')); }}""")
        page.wait_for_function(f"document.getElementById('arch').dataset.step === '{step}' && {IDLE}")
        # The page colours heads by their induction score at the scrubbed step.
        return page.eval_on_selector_all("#arch .node[data-layer='1']", "nodes => nodes.map(n => [n.dataset.node, Number(n.dataset.induction)])")

    early = scrub_to(400)  # before the transition (near step 1,100): no induction head yet
    assert max(score for _, score in early) < 0.3, early
    scores = scrub_to(1600)  # after it
    page.screenshot(path=str(screenshots / "dashboard_timeline.png"), full_page=True)

    node, score = max(scores, key=lambda pair: pair[1])
    assert score > 0.5, scores
    # Every head is clickable where it is drawn (nothing of a neighbour lies over it); the strongest last.
    for name in sorted((name for name, _ in scores), key=lambda name: name == node):
        page.click(f"#arch [data-node='{name}']")
        page.wait_for_function(IDLE)
        assert page.inner_text("#head-title") == f"Head {name}"
    assert page.locator("#attention-plot .main-svg").count() > 0

    page.select_option("#ablate-mode", "mean")
    page.click("#ablate-btn")
    page.wait_for_function("document.getElementById('ablate-result').dataset.seq === '1'")
    result = page.locator("#ablate-result")
    before, after = float(result.get_attribute("data-before")), float(result.get_attribute("data-after"))
    assert after - before > 1.0, (before, after)
    assert "copy-position loss" in result.inner_text()
    assert page.locator("#loss-plot .legendtext").all_text_contents() == ["clean", "ablated"]
    page.locator("#model-view").screenshot(path=str(screenshots / "dashboard_model_view.png"))
    assert page.locator("#error-bar").is_hidden() and not page.errors


def test_patching_and_gradients_render_and_bad_input_shows_a_message(page, induced_run):
    page.select_option("#run-select", induced_run.name)
    page.wait_for_function(f"window.phaselens.run === '{induced_run.name}' && {IDLE}")
    page.click("#patch-btn")
    page.wait_for_function("document.getElementById('patch-result').textContent.includes('recovered')")
    page.click("#grad-btn")
    page.wait_for_selector("#grad-plot .main-svg")
    page.fill("#text-input", "1 2 999")
    page.click("#run-text")
    page.wait_for_selector("#error-bar:not([hidden])")
    assert "vocabulary size 64" in page.inner_text("#error-bar")
    assert not page.errors


def test_the_neuron_view_shows_the_contexts_of_the_artifact_phaselens_neurons_wrote(page, text_run, screenshots):
    from phaselens.store.neuron_artifact import read_neuron_artifact

    artifact = read_neuron_artifact(next((text_run / "artifacts" / "neurons").glob("step_*.json")))
    page.select_option("#run-select", text_run.name)
    page.wait_for_function(f"window.phaselens.run === '{text_run.name}' && {IDLE}")
    page.wait_for_selector("#neurons-view:not([hidden]) #neuron-contexts li")
    assert page.locator("#neuron-layer option").all_text_contents() == ["layer 0 (blocks.0.mlp.hook_post)"]
    assert page.locator("#neuron-hist .main-svg").count() > 0
    first = artifact.layers[0].most_selective[0]
    items = page.locator("#neuron-contexts li")
    assert items.count() == len(first.contexts)
    shown = items.first
    assert shown.locator("mark").inner_text() == first.contexts[0].token.replace("\n", "↵")
    text = shown.inner_text()
    assert first.contexts[0].before.replace("\n", "↵")[-12:] in text  # the Shakespeare text before the activating byte
    page.locator("#neurons-view").screenshot(path=str(screenshots / "dashboard_neurons.png"))
    assert page.locator("#error-bar").is_hidden() and not page.errors
