"""Dashboard latency: in the browser, from clicking Ablate to the updated loss view, on the demo model.

Serves a run (default: trains the demo model for 1,600 steps into a temporary folder, about a
minute; pass --run DIR to use an existing one, e.g. runs/demo), opens the page in headless
Chromium, clicks the layer-1 induction head, then clicks Ablate 20 times. Each time is measured
in the page, from the click to the end of the loss plot's redraw (request, two forwards, JSON,
Plotly). Last line: {"benchmark": "dashboard_latency", "ablate_ms_median": ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import phaselens as pl

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLICK_AND_WAIT = """async () => {
    const result = document.getElementById('ablate-result');
    const seq = result.dataset.seq;
    const done = new Promise((resolve) => document.addEventListener('phaselens:ablated', resolve, { once: true }));
    const start = performance.now();
    document.getElementById('ablate-btn').click();
    await done;
    await new Promise((resolve) => requestAnimationFrame(() => resolve()));  // the redraw reached the screen
    if (result.dataset.seq === seq) throw new Error('the loss view did not update');
    return performance.now() - start;
}"""


def demo_run(folder: Path) -> Path:
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    path = folder / "demo"
    train(load_config("induction", ["train.steps=1600", "train.checkpoint_every=400", "telemetry.every=20", "name=demo"]), path, progress=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an induction run to serve (default: train one)")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or demo_run(Path(tmp))
        handle = pl.serve(run=run)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(handle.url)
                page.wait_for_selector("body[data-ready='1'][data-busy='0']", timeout=60_000)
                scores = page.eval_on_selector_all("#arch .node[data-layer='1']", "ns => ns.map(n => [n.dataset.node, Number(n.dataset.induction)])")
                node = max(scores, key=lambda pair: pair[1])[0]
                page.click(f"#arch [data-node='{node}']")
                page.wait_for_selector("body[data-busy='0'] #attention-plot .main-svg")
                page.evaluate(CLICK_AND_WAIT)  # warm-up: first forward with hooks, first bar chart
                times = [page.evaluate(CLICK_AND_WAIT) for _ in range(args.clicks)]
                summary = page.inner_text("#ablate-result")
                browser.close()
        finally:
            handle.stop()
    print(f"{node} ablated ({summary}); {args.clicks} clicks, ms: {', '.join(f'{t:.0f}' for t in times)}")
    print(json.dumps({"benchmark": "dashboard_latency", "ablate_ms_median": round(statistics.median(times), 1),
                      "ablate_ms_max": round(max(times), 1), "clicks": args.clicks, "node": node}))


if __name__ == "__main__":
    main()
