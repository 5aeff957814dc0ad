"""The dashboard in a real browser on models that are not phaselens transformers: a revision of an
imported Hugging Face series (click a head, see its attention over the decoded words, ablate it, see
the loss change), and a notebook's `TransformerBridge` of Pythia-410m's shape, 24 layers × 16 heads,
whose map stays legible and clickable. Screenshots go to test-output/ (CI keeps that folder)."""

from __future__ import annotations

import pytest

IDLE = "document.body.dataset.busy === '0'"  # no request or redraw in flight

pytestmark = pytest.mark.slow


def test_open_an_imported_revision_click_a_head_ablate_it_and_the_loss_changes(browser, open_dashboard, imported_run,
                                                                                probed_imported_run, screenshots):
    with open_dashboard(browser, run=[imported_run, probed_imported_run]) as page:
        assert page.evaluate("window.phaselens.run") == imported_run.name
        assert "GPTNeoXForCausalLM" in page.inner_text("#model-source")
        assert "tokenizer" in page.inner_text("#text-label")
        page.evaluate("""() => { const s = document.getElementById('step-slider');
            s.value = 1; s.dispatchEvent(new Event('input')); }""")  # the middle revision, step 10
        page.wait_for_function(f"document.getElementById('arch').dataset.step === '10' && {IDLE}")

        page.fill("#text-input", "the cat sat on the mat . the cat sat on the mat .")
        page.click("#run-text")
        page.wait_for_function(f"document.getElementById('mean-loss').textContent !== '–' && {IDLE}")
        page.click("#arch [data-node='L1H2']")
        page.wait_for_function(IDLE)
        assert page.inner_text("#head-title") == "Head L1H2"
        ticks = page.locator("#attention-plot .xtick text").all_text_contents()
        assert "1:cat" in ticks and "5:mat" in ticks  # the tokens decoded by the model's own tokenizer
        assert "tokens this head" in page.inner_text("#circuits-note")  # 320 tokens: the circuits on its top-k
        assert page.locator("#qk-plot .main-svg").count() > 0
        # no heads rows yet: a note says how to measure them, and no empty axes are drawn
        assert page.locator("#head-scores-plot").is_hidden()
        assert "phaselens probe RUN --probes heads" in page.inner_text("#head-scores-note")

        page.select_option("#ablate-mode", "zero")
        page.click("#ablate-btn")
        page.wait_for_function("document.getElementById('ablate-result').dataset.seq === '1'")
        result = page.locator("#ablate-result")
        before, after = float(result.get_attribute("data-before")), float(result.get_attribute("data-after"))
        assert abs(after - before) > 1e-3, (before, after)
        assert page.locator("#loss-plot .legendtext").all_text_contents() == ["clean", "ablated"]
        page.locator("#model-view").screenshot(path=str(screenshots / "dashboard_imported_attention.png"))

        page.click("#patch-btn")
        page.wait_for_function("document.getElementById('patch-result').textContent.includes('recovered')")

        # the same series after `phaselens probe --probes heads`: the head's scores over training
        page.select_option("#run-select", "probed")
        page.wait_for_function(f"window.phaselens.run === 'probed' && {IDLE}")
        page.click("#arch [data-node='L1H2']")
        page.wait_for_function(IDLE)
        assert page.locator("#head-scores-note").is_hidden()
        assert page.locator("#head-scores-plot .scatterlayer .trace").count() == 3  # induction, prev_token, duplicate
        assert page.locator("#head-scores-plot .legendtext").all_text_contents() == ["induction", "prev_token", "duplicate"]
        points = page.evaluate("document.getElementById('head-scores-plot').data.map(t => t.x)")
        assert points == [[0, 10, 30]] * 3  # every revision
        page.locator("#head-panel").screenshot(path=str(screenshots / "dashboard_imported_head_scores.png"))
        assert page.locator("#error-bar").is_hidden() and not page.errors


@pytest.fixture(scope="module")
def pythia_410m_shaped(tmp_path_factory):
    """A GPT-NeoX of Pythia-410m's layout, 24 layers × 16 heads, shrunk to d_model 64 (random weights, 1,000 tokens)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    from phaselens.series.toy import toy_tokenizer

    path = tmp_path_factory.mktemp("pythia410m-shape")
    config = GPTNeoXConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=24, num_attention_heads=16, intermediate_size=64,
                           max_position_embeddings=64, rotary_pct=0.25, bos_token_id=1, eos_token_id=1)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    toy_tokenizer("the cat sat on the mat .\na dog ran to the house .").save_pretrained(path)
    return TransformerBridge.boot_transformers(str(path), device="cpu")


def test_the_map_of_24_layers_by_16_heads_is_legible_and_every_box_clickable(browser, open_dashboard, pythia_410m_shaped,
                                                                              screenshots):
    with open_dashboard(browser, model=pythia_410m_shaped) as page:
        page.wait_for_function("document.querySelectorAll('#arch .node').length > 0")
        boxes = page.eval_on_selector_all("#arch .node", """nodes => nodes.map(n => {
            const r = n.querySelector('rect').getBoundingClientRect();
            return [n.dataset.node, r.x, r.y, r.width, r.height, n.querySelector('text').textContent]; })""")
        assert len(boxes) == 24 * 17  # 16 heads and an MLP per layer
        assert min(b[3] for b in boxes) >= 20 and min(b[4] for b in boxes) >= 16, "boxes too small to read or hit"
        rows = sorted({round(b[2]) for b in boxes})
        assert len(rows) == 24 and min(b - a for a, b in zip(rows, rows[1:])) >= 20  # one row per layer, apart
        labels = {b[0]: b[5] for b in boxes}
        assert labels["L23H15"] == "15" and labels["L0MLP"] == "MLP"
        page.locator("#arch").screenshot(path=str(screenshots / "dashboard_map_24x16.png"))
        # Each box takes its own click at its centre: nothing of a neighbour lies over it.
        hits = page.eval_on_selector_all("#arch .node", """nodes => nodes.map(n => {
            n.scrollIntoView({ block: "center" });
            const r = n.querySelector('rect').getBoundingClientRect();
            const top = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
            return top && top.closest('.node') ? top.closest('.node').dataset.node : null; })""")
        assert hits == [b[0] for b in boxes]
        for name in ("L23H15", "L0H0", "L12H7"):
            page.click(f"#arch [data-node='{name}']")
            page.wait_for_function(IDLE)
            assert page.inner_text("#head-title") == f"Head {name}"
        assert "tokens this head" in page.inner_text("#circuits-note")  # 1,000 tokens: top-k, whatever the vocabulary
        page.click("#arch [data-node='L5MLP']")
        page.wait_for_function(IDLE)
        assert page.inner_text("#head-title") == "Layer 5 MLP"
        assert page.locator("#error-bar").is_hidden() and not page.errors
