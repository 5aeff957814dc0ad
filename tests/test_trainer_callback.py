"""`pl.TelemetryCallback`: a tiny `transformers.Trainer` run on the CPU becomes a phaselens run that
`probe`, `report` and the dashboard API open, and its live rows are the Trainer's own forward."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import phaselens as pl
from phaselens.cli import app
from phaselens.errors import ConfigError, RunError
from phaselens.series.toy import toy_tokenizer

README = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "own-training-loop.md"  # the Trainer example's page
SEQUENCES, LENGTH = 16, 24


class Sequences(torch.utils.data.Dataset):
    """Rows of token ids for causal LM training: {"input_ids", "labels"} of one length."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens  # (N, T)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> tuple[Path, Sequences]:
    """A 2-layer GPT-NeoX with random weights and a word-level tokenizer, saved; 16 sequences of 24 tokens."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    text = " ".join(f"the {a} saw a {b} near the {c} ." for a, b, c in zip(["cat", "dog", "bird"] * 40, ["tree", "house"] * 60,
                                                                         ["river", "mat", "song", "hill"] * 30))
    tokenizer = toy_tokenizer(text)
    tokenizer.pad_token = tokenizer.eos_token  # the Trainer's default collator pads (a no-op on rows of one length)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25, bos_token_id=1, eos_token_id=1,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("neox") / "tiny-neox"
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return model_dir, Sequences(ids[: SEQUENCES * LENGTH].view(SEQUENCES, LENGTH))


def readme_trainer_code(model_dir: Path, root: Path, steps: int) -> str:
    """The README's Trainer example with local paths, `steps` steps and a checkpoint every 2."""
    code = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "pl.TelemetryCallback(" in b)
    return (code.replace("models/tiny-neox", str(model_dir)).replace("checkpoints/tiny-neox", str(root / "hf"))
            .replace("runs/tiny-neox", str(root / "run")).replace("max_steps=300, save_steps=50", f"max_steps={steps}, save_steps=2")
            .replace("report_to=[])", "report_to=[], use_cpu=True, disable_tqdm=True)"))


@pytest.fixture(scope="module")
def trained(neox, tmp_path_factory):
    """The README's Trainer example, 6 steps, a checkpoint every 2; every batch is the whole (shuffled) dataset."""
    model_dir, dataset = neox
    root = tmp_path_factory.mktemp("trainer")
    code = readme_trainer_code(model_dir, root, steps=6)
    exec(code, {"dataset": dataset})
    return root / "run", root / "hf", dataset, code


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow  # a Trainer run, then probe: ~25 s on 2 cores
def test_trainer_run_is_a_phaselens_run_whose_live_rows_equal_its_checkpoints(trained):
    run_dir, output_dir, dataset, _ = trained
    run = pl.open_run(run_dir)
    assert run.status == "finished" and run.info["steps_done"] == 6
    assert run.checkpoint_steps() == [2, 4, 6]
    reference = json.loads((run_dir / "checkpoints" / "step_00000004" / "reference.json").read_text())
    assert reference == {"source": str(output_dir.resolve()), "revision": "checkpoint-4", "local": True}
    assert run.config["model"]["kind"] == "hf" and run.config["model"]["n_layers"] == 2
    assert torch.equal(run.probe_batch().tokens, dataset.tokens)  # the first probe_size (16) sequences: all of them

    live = run.metrics(source="live")
    assert sorted(live["step"].unique()) == list(range(6))
    assert set(live["probe"]) == {"attention", "heads", "loss"}

    invoke("probe", run_dir, "--probes", "attention,heads,loss")
    checkpoint = run.metrics(source="checkpoint")
    # Live at step s: the Trainer's forward of the (shuffled) dataset with the weights after s updates.
    # Checkpoint s: those weights, booted through TransformerBridge, on the same sequences. Means agree.
    key = ["probe", "metric", "layer", "head"]
    for step in (2, 4):
        a = live[(live["step"] == step) & (live["probe"] != "heads")].set_index(key)["value"]
        b = checkpoint[(checkpoint["step"] == step) & (checkpoint["probe"] != "heads")].set_index(key)["value"]
        # per head (8): entropy, coherence, specialization; per layer (2): specialization, variance; the loss
        assert len(a) == len(b) == 3 * 8 + 2 * 2 + 1
        assert (a - b.loc[a.index]).abs().max() < 1e-4
    loss = live[live["probe"] == "loss"].set_index("step")["value"]
    assert loss[5] < loss[0] - 0.1  # the Trainer really trained: the live loss follows it

    # Head scores at checkpoints read the run's induction batch: ordinary ids of the tokenizer, a repeated segment
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    from phaselens.probes.heads import detection_patterns, head_score

    induction = run.probe_batches()["induction"]
    special = set(AutoTokenizer.from_pretrained(output_dir / "checkpoint-4").all_special_ids)
    assert induction.tokens.shape == (SEQUENCES, LENGTH) and not special & set(induction.tokens.unique().tolist())
    assert bool(induction.positions["copy"].any(-1).all())
    model = GPTNeoXForCausalLM.from_pretrained(output_dir / "checkpoint-4", attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = model(induction.tokens, output_attentions=True).attentions  # L x (B, H, T, T)
    D = detection_patterns(induction.tokens)
    for metric in ("induction", "prev_token", "duplicate"):
        stored = checkpoint[(checkpoint["step"] == 4) & (checkpoint["probe"] == "heads") & (checkpoint["metric"] == metric)]
        direct = torch.stack([head_score(a, D[metric]) for a in attentions]).flatten()  # (L·H,)
        torch.testing.assert_close(torch.tensor(stored.sort_values(["layer", "head"])["value"].to_numpy(), dtype=torch.float32),
                                   direct, atol=1e-4, rtol=0)
    invoke("probe", run_dir, "--probes", "attention_to,patching")  # they read the induction batch's copies and sources
    rows = run.metrics(source="checkpoint")
    assert len(rows[(rows["probe"] == "attention_to") & (rows["step"] == 4)]) == 8  # per head
    assert len(rows[(rows["probe"] == "patching") & (rows["metric"] == "effect") & (rows["step"] == 4)]) == 3  # per residual stream


@pytest.mark.slow
def test_report_and_dashboard_open_the_trainer_run(trained):
    run_dir, _, _, _ = trained
    invoke("report", run_dir)
    report = (run_dir / "report" / "report.md").read_text()
    assert "trained by `transformers.Trainer`" in report and "GPTNeoXForCausalLM" in report
    assert (run_dir / "report" / "entropy_heatmap.png").stat().st_size > 10_000

    from phaselens.server import build

    server, _ = build([run_dir])
    with TestClient(server, base_url="http://127.0.0.1:8050") as client:  # loopback refuses foreign Host headers
        runs = client.get("/api/runs").json()["runs"]
        assert runs[0]["status"] == "finished" and runs[0]["checkpoints"] == [2, 4, 6]
        rows = client.get(f"/api/runs/{run_dir.name}/metrics", params={"probe": "attention", "metric": "entropy",
                                                                          "source": "live"}).json()
        assert set(rows["step"]) == set(range(6)) and len(rows["value"]) == 6 * 8
        sample = client.get(f"/api/runs/{run_dir.name}/sample").json()
        batches = pl.open_run(run_dir).probe_batches()  # the dashboard opens on the induction batch where the run has one
        assert sample["tokens"] == batches.get("induction", batches["probe"]).tokens[0].tolist()


def _tiny_model():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=16, max_position_embeddings=16))


def test_a_directory_with_another_run_or_other_files_is_refused(induction_run, tmp_path):
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True)
    with pytest.raises(RunError, match="already holds a run"):
        pl.TelemetryCallback(induction_run).on_train_begin(args, TrainerState(), None, model=_tiny_model())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty and holds no phaselens run"):
        pl.TelemetryCallback(tmp_path / "notes").on_train_begin(args, TrainerState(), None, model=_tiny_model())
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"] and (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_live_probe_that_needs_the_residual_stream_is_refused_with_the_post_hoc_command(tmp_path):
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True)
    callback = pl.TelemetryCallback(tmp_path / "run", probes=["attention", "logit_lens"])
    with pytest.raises(ConfigError, match="phaselens probe RUN --probes logit_lens"):
        callback.on_train_begin(args, TrainerState(), None, model=_tiny_model())
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow  # last in the module: it adds steps to the shared run
def test_a_resumed_trainer_continues_its_run_and_measures_the_resumed_steps_again(trained):
    run_dir, output_dir, dataset, code = trained
    before = pl.open_run(run_dir).metrics(source="live")
    resumed = (code.replace("max_steps=6", "max_steps=8, save_total_limit=2")
               .replace("trainer.train()", f"trainer.train(resume_from_checkpoint={str(output_dir / 'checkpoint-4')!r})"))
    exec(resumed, {"dataset": dataset})
    run = pl.open_run(run_dir)
    after = run.metrics(source="live")
    # save_total_limit=2: the Trainer deleted checkpoint-2 and -4, and the run's references to them went too
    assert run.status == "finished" and run.checkpoint_steps() == [6, 8]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]
    assert sorted(after["step"].unique()) == list(range(8)) and len(after) == 8 * len(before) // 6  # no step twice
    key = ["step", "probe", "metric", "layer", "head"]
    kept = after[after["step"] < 4].set_index(key)["value"]
    assert kept.equals(before[before["step"] < 4].set_index(key)["value"].loc[kept.index])  # earlier steps untouched


@pytest.mark.slow  # probe + report + serve of the 6-step Trainer run: ~10 s
def test_the_pages_probe_report_and_serve_commands_run_on_the_trainer_run(neox, tmp_path):
    """The commands after the Trainer example in docs/tutorials/own-training-loop.md, as typed, on its own run."""
    from test_docs import page_block, run_shell_block

    model_dir, dataset = neox
    exec(readme_trainer_code(model_dir, tmp_path, steps=4), {"dataset": dataset})
    run_dir = tmp_path / "run"
    block = page_block("docs/tutorials/own-training-loop.md", "phaselens probe runs/tiny-neox", "bash")
    ran = run_shell_block(block.replace("runs/tiny-neox", str(run_dir)), tmp_path)
    assert [line.split()[1] for line in ran] == ["probe", "report", "serve"]
    assert (run_dir / "report" / "report.md").is_file()
