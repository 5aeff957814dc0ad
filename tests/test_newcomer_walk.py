"""What a newcomer met walking the README and the docs on a fresh clone (issue 26), each kept fixed by a test."""

from __future__ import annotations

import re

import phaselens.progress
from phaselens.training.config import load_config
from phaselens.training.trainer import NAN_CHECK_EVERY, train


def test_a_training_log_line_comes_between_the_loss_checks_when_steps_are_slow(tmp_path, capsys, monkeypatch):
    """A slow run (BDH on 2 cores: ~3 s a step) logged a line only every 50 steps, 2–3 minutes apart, against
    the docs' "every 10 seconds": the bar heard of a step only when the trainer checked the loss for NaN."""
    monkeypatch.setattr(phaselens.progress, "LOG_SECONDS", 0.0)  # every step is "10 seconds later"
    steps = NAN_CHECK_EVERY // 5
    config = load_config("induction", [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={steps}",
                                       "telemetry.every=1000", "telemetry.probes=[loss]"])
    train(config, tmp_path / "run")
    logged = [int(m[1]) for m in re.finditer(rf"^train \S+ (\d+)/{steps} steps", capsys.readouterr().out, flags=re.M)]
    assert set(range(1, steps + 1)) <= set(logged), logged


def test_the_trainer_example_runs_on_the_dataset_the_page_makes_for_the_example_model(tiny_hf_models, tmp_path):
    """docs/tutorials/own-training-loop.md's Trainer example read a `dataset` no block made (NameError), and on
    the example model, whose tokenizer has no pad token, the Trainer's collator refused to pad."""
    import phaselens as pl
    from test_docs import page_block
    from test_trainer_callback import readme_trainer_code

    model_dir = tiny_hf_models["gpt_neox"]  # what the page's example-models block saves as models/tiny-neox
    namespace: dict = {}
    exec(page_block("docs/tutorials/own-training-loop.md", "dataset = [").replace("models/tiny-neox", str(model_dir)), namespace)
    assert len(namespace["dataset"]) == 64 and namespace["dataset"][0]["input_ids"].shape == (24,)
    exec(readme_trainer_code(model_dir, tmp_path, steps=2), namespace)
    run = pl.open_run(tmp_path / "run")
    assert run.status == "finished" and run.checkpoint_steps() == [2]


def test_a_task_the_command_line_does_not_know_says_how_to_plug_one_in(tmp_path):
    """docs/tutorials/own-study.md's `phaselens train recall_first.yaml`, typed before the module is an entry point."""
    from typer.testing import CliRunner

    from phaselens.cli import app

    config = tmp_path / "recall_first.yaml"
    config.write_text("name: recall_first\ndata: {task: recall_first_not_registered}\n")
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "'phaselens.plugins' entry point" in result.output and "own-study.md" in result.output, result.output


def test_a_checkpoint_whose_final_norm_bias_is_orthogonal_to_one_over_its_weight_exports_as_gpt2():
    """export.md's `phaselens export runs/demo --format hf-series` stopped at the demo's step 1300: the fold of b_U
    through ln_final divides by c = b·(1/w), which training moves through zero (the demo's does, twice)."""
    import torch

    import phaselens as pl
    from phaselens.export.gpt2 import LOGIT_TOLERANCE, to_gpt2, verify_logits

    torch.manual_seed(0)
    model = pl.build_model(pl.ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=32, n_ctx=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # trained-like: b_U and ln_final's bias away from 0
        w, b = model.ln_final.w, model.ln_final.b
        b -= (b @ (1 / w)) / (1 / w).pow(2).sum() * (1 / w)  # c = b·(1/w) = 0
        assert abs(float(b @ (1 / w))) < 1e-5 and model.b_U.abs().min() > 0
    tokens = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    assert verify_logits(model, to_gpt2(model), tokens) <= LOGIT_TOLERANCE


def test_a_missing_ray_is_said_before_any_checkpoint_is_started(run_copy, monkeypatch):
    """The circuits page's `--backend ray` without Ray printed `probe run 0/3 checkpoints` first, then the install line."""
    import sys

    from typer.testing import CliRunner

    from phaselens.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(app, ["probe", str(run_copy), "--probes", "loss", "--backend", "ray"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.lstrip().startswith("error: --backend ray needs Ray: pip install 'phaselens[ray]'"), result.output
