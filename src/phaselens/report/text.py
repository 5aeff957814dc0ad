"""The report part of byte-level text runs: how far the loss fell under the byte-unigram entropy."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from phaselens.report import StudyReport, figures_section, register_study
from phaselens.report.plotting import Figure, save_tight
from phaselens.run import Run


def text_entropy(run: Run) -> float | None:
    """The byte-unigram entropy of the run's training text (None when the text is gone)."""
    from phaselens.tasks.text_config import unigram_entropy

    data = run.config.get("data") or {}
    try:
        if data.get("corpus") == "shakespeare":
            from phaselens.tasks.shakespeare import shakespeare_path

            return unigram_entropy(shakespeare_path(), data.get("eval_fraction", 0.1))
        return unigram_entropy(data["path"], data.get("eval_fraction", 0.1))
    except (OSError, KeyError):
        return None


def plot_text_loss(run: Run, entropy: float | None, path: Path) -> Figure:
    losses = run.metrics(probe="loss")
    series = {m: losses[losses["metric"] == m].sort_values("step") for m in ("train", "eval")}
    if all(frame.empty for frame in series.values()):
        return Figure(None, ["loss"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for metric, frame in series.items():
        if len(frame):
            ax.plot(frame["step"], frame["value"], label=f"{metric} loss", lw=1.2 if metric == "eval" else 0.8)
    if entropy is not None:
        ax.axhline(entropy, color="#b03030", ls=":", label=f"byte-unigram entropy {entropy:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per byte")
    ax.legend(fontsize=8)
    return save_tight(fig, path)


@register_study("text")
def text_study(run: Run, out: Path) -> StudyReport:
    entropy = text_entropy(run)
    evals = run.metrics(probe="loss", metric="eval").sort_values("step")
    model = run.config["model"]
    text = f"Run `{run.path}` ({run.status}): a {model.get('kind', 'transformer')} model on bytes of "
    text += f"{(run.config.get('data') or {}).get('corpus') or (run.config.get('data') or {}).get('path')}."
    if len(evals):
        final = float(evals["value"].iloc[-1])
        text += f" Held-out loss at step {int(evals['step'].iloc[-1])}: {final:.3f} nats per byte"
        if entropy is not None:
            text += f", against a byte-unigram entropy of {entropy:.3f} (a model that ignores context)"
        text += "."
    figures = {"loss": plot_text_loss(run, entropy, out / "loss.png")}
    captions = {"loss": "Training and held-out loss; dotted: the byte-unigram entropy of the training text."}
    return StudyReport(summary=[text], figures=figures_section(figures, captions))
