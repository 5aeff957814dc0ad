"""examples/training_telemetry.ipynb runs top to bottom: it trains with telemetry, plots the heatmaps,
opens the dashboard in-process and sees the copy-position loss rise when it ablates the induction head."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "training_telemetry.ipynb"


@pytest.mark.slow
def test_training_telemetry_notebook_ablates_the_induction_head_and_the_copy_loss_rises(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = Path(__file__).resolve().parents[1] / "test-output"
    out.mkdir(exist_ok=True)
    nbformat.write(notebook, out / NOTEBOOK.name)  # the executed notebook, kept by CI
    outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", [])) for i, cell in enumerate(notebook.cells)}
    text = "\n".join(outputs.values())
    assert "trained 1500 steps" in text
    assert "mean-ablated: copy-position loss" in text
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the heatmaps were not drawn"
    iframes = [o for cell in notebook.cells for o in cell.get("outputs", []) if "<iframe" in o.get("data", {}).get("text/html", "")]
    assert iframes, "the dashboard was not shown inline"
