"""A BDH run in the dashboard, in a real browser (Debian's headless Chromium driven by Playwright): the map shows
BDH's heads and sparse neurons as its adapter reports them, the default text is its Shakespeare text in characters,
and the neuron view's layer picks that layer's neurons and contexts. Screenshots go to test-output/ and /tmp/notes/shots/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import phaselens as pl

pytestmark = pytest.mark.slow  # trains a tiny BDH, then a browser

IDLE = "document.body.dataset.busy === '0'"  # no request or redraw in flight
SHOTS = Path("/tmp/notes/shots")
TINY_BDH = ["model.n_layers=2", "model.d_model=16", "model.n_heads=2", "model.multiplier=2", "model.n_ctx=32",
            "train.steps=10", "train.batch_size=4", "train.checkpoint_every=10", "train.eval_every=10", "train.warmup=0",
            "train.threads=1", "telemetry.every=5", "data.probe_size=4", "data.eval_size=4", "name=bdh"]


def shoot(locator, screenshots: Path, name: str) -> None:
    locator.screenshot(path=str(screenshots / f"{name}.png"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshots / f"{name}.png", SHOTS / f"{name}.png")


@pytest.fixture(scope="module")
def bdh_run(tmp_path_factory) -> Path:
    """The BDH Shakespeare preset shrunk to 2 passes of 2 heads × 16 neurons, 10 steps, with its neuron report."""
    from phaselens.analysis.neurons import neurons_report
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    path = tmp_path_factory.mktemp("bdh") / "bdh"
    train(load_config("bdh_shakespeare_small", TINY_BDH), path, progress=False)
    neurons_report(path, n_tokens=1024, top_k=4, window=16, progress=False)
    return path


@pytest.fixture(scope="module")
def page(browser, open_dashboard, bdh_run):
    with open_dashboard(browser, run=[bdh_run]) as page:
        yield page


def test_the_map_shows_bdh_heads_and_neurons_and_the_text_is_characters(page, bdh_run, screenshots):
    model = pl.open_run(bdh_run).load_model(10)
    heads, neurons = model.cfg.n_heads, model.cfg.n_neurons
    source = page.inner_text("#model-source")
    assert "× 0 heads" not in source
    assert f"2 passes of one shared block × {heads} linear-attention heads of {neurons} sparse neurons" in source, source
    assert f"({heads * neurons} neurons per layer)" in source
    drawn = page.eval_on_selector_all("#arch .node.linear", "nodes => nodes.map((n) => n.dataset.node)")
    assert drawn == [f"L{layer}H{head}" for layer in range(2) for head in range(heads)]

    text = page.input_value("#text-input")
    probe = pl.open_run(bdh_run).probe_batch().tokens[0].tolist()
    assert text.encode("utf-8") == bytes(probe)  # the probe batch's own bytes, shown as the characters they are
    assert any(c.isalpha() for c in text) and not text.replace(" ", "").isdigit()
    assert "probe batch" in page.inner_text("#sample-note")
    assert page.inner_text("#copy-loss") != "–"  # the loss view ran on that text
    shoot(page.locator("#model-view"), screenshots, "dashboard_bdh_map_text")
    assert page.locator("#error-bar").is_hidden() and page.errors == []


def test_changing_the_neuron_layer_shows_that_layers_neurons_and_contexts(page, screenshots):
    def neuron_view() -> tuple[list[str], list[str], str]:
        options = page.eval_on_selector_all("#neuron-select option", "nodes => nodes.map((n) => n.textContent)")
        contexts = page.eval_on_selector_all("#neuron-contexts li", "nodes => nodes.map((n) => n.textContent)")
        return options, contexts, page.locator("#neuron-hist .gtitle").text_content()

    assert page.locator("#neurons-view").is_visible()
    options, contexts, title = neuron_view()
    assert options and all(o.startswith("blocks.0.hook_xy_sparse #") for o in options), options
    assert contexts and title.startswith("blocks.0.hook_xy_sparse")
    page.select_option("#neuron-layer", "1")
    page.wait_for_function(IDLE)
    options1, contexts1, title1 = neuron_view()
    assert options1 and all(o.startswith("blocks.1.hook_xy_sparse #") for o in options1), options1
    assert title1.startswith("blocks.1.hook_xy_sparse")
    assert contexts1 and contexts1 != contexts  # layer 1's first neuron, not layer 0's
    shoot(page.locator("#neurons-view"), screenshots, "dashboard_bdh_neurons_layer1")
    assert page.errors == []
