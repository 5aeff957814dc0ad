"""Checkpoints: safetensors only, written atomically, exact round trips, clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phaselens.errors import CheckpointError
from phaselens.models import ModelConfig, build_model
from phaselens.models.transformer import Transformer  # noqa: F401  (TransformerLens loads slowly: pay it at collection)
from phaselens.run import open_run
from phaselens.models.checkpoints import load_trainer_state, load_weights, save_checkpoint

TINY = ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=11, n_ctx=8)


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with the trainer's two groups: decay on matrices, none on vectors."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)


def train_steps(model, optimizer, generator: torch.Generator, steps: int) -> None:
    for _ in range(steps):
        tokens = torch.randint(0, 11, (4, 8), generator=generator)
        logits = model(tokens)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ---------------------------------------------------------------------------- exact round trip


def test_save_then_load_restores_weights_and_adamw_state_exactly(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = make_optimizer(model)
    data = torch.Generator().manual_seed(0)
    train_steps(model, optimizer, data, steps=3)
    rng = {"torch": torch.get_rng_state(), "data": data.get_state()}
    save_checkpoint(tmp_path / "step_00000003", model, optimizer, rng, {"step": 3})

    torch.manual_seed(1)  # a differently initialised model, so nothing matches by accident
    restored = build_model(TINY)
    restored_optimizer = make_optimizer(restored)
    load_weights(restored, tmp_path / "step_00000003")
    info, restored_rng = load_trainer_state(tmp_path / "step_00000003", restored_optimizer)

    assert info["step"] == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    saved_state, loaded_state = optimizer.state_dict(), restored_optimizer.state_dict()
    assert saved_state["param_groups"] == loaded_state["param_groups"]
    assert saved_state["state"].keys() == loaded_state["state"].keys()
    for index, entry in saved_state["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded_state["state"][index][key], entry[key]), (index, key)
    assert torch.equal(restored_rng["torch"], rng["torch"])
    assert torch.equal(restored_rng["data"], rng["data"])


def test_training_on_from_a_loaded_checkpoint_matches_training_without_a_break(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = make_optimizer(model)
    data = torch.Generator().manual_seed(0)
    train_steps(model, optimizer, data, steps=2)
    save_checkpoint(tmp_path / "step", model, optimizer, {"data": data.get_state()})
    train_steps(model, optimizer, data, steps=2)

    resumed = build_model(TINY)
    resumed_optimizer = make_optimizer(resumed)
    load_weights(resumed, tmp_path / "step")
    _, rng = load_trainer_state(tmp_path / "step", resumed_optimizer)
    resumed_data = torch.Generator()
    resumed_data.set_state(rng["data"])
    train_steps(resumed, resumed_optimizer, resumed_data, steps=2)

    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_resaving_a_step_replaces_it_and_leaves_no_temporary_directories(tmp_path):
    torch.manual_seed(0)
    first, second = build_model(TINY), build_model(TINY)
    save_checkpoint(tmp_path / "step_00000010", first)
    save_checkpoint(tmp_path / "step_00000010", second)
    assert torch.equal(load_file(str(tmp_path / "step_00000010" / "model.safetensors"))["W_E"], second.W_E.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]


# ---------------------------------------------------------------------------- what is on disk


def test_checkpoints_hold_only_safetensors_and_json(induction_run):
    files = [p for p in (induction_run / "checkpoints").rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} == {"step_00000000", "step_00000010", "step_00000020"}
    for file in files:
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file} looks like a pickle / torch.save file"
        if file.suffix == ".safetensors":
            load_file(str(file))  # parses as safetensors
        else:
            assert file.suffix == ".json", file
            json.loads(file.read_text())


def test_no_temporary_entries_are_left_next_to_checkpoints(induction_run):
    leftovers = [p for p in (induction_run / "checkpoints").rglob(".*")]
    assert leftovers == []


def test_load_model_gives_the_saved_weights_as_a_hookable_model(induction_run):
    run = open_run(induction_run)
    assert run.checkpoint_steps() == [0, 10, 20]
    model = run.load_model(10)
    saved = load_file(str(induction_run / "checkpoints" / "step_00000010" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not torch.equal(model.W_E, run.load_model(0).W_E)  # steps 0 and 10 differ
    _, cache = model.run_with_cache(torch.zeros(1, 64, dtype=torch.long))
    assert cache["blocks.1.attn.hook_pattern"].shape == (1, 2, 64, 64)


# ---------------------------------------------------------------------------- bad checkpoints


def checkpoint_file(run: Path, step: int, name: str = "model.safetensors") -> Path:
    return run / "checkpoints" / f"step_{step:08d}" / name


@pytest.mark.parametrize("keep", ["nothing", "4 bytes", "the header only", "all but the last byte", "half"])
def test_truncated_weights_give_a_checkpoint_error_naming_the_file(run_copy, keep):
    file = checkpoint_file(run_copy, 10)
    data = file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, data
    cut = {"nothing": 0, "4 bytes": 4, "the header only": header_end, "all but the last byte": len(data) - 1, "half": len(data) // 2}
    file.write_bytes(data[: cut[keep]])
    with pytest.raises(CheckpointError) as caught:
        open_run(run_copy).load_model(10)
    assert str(file) in str(caught.value)


def test_garbage_weights_give_a_checkpoint_error_naming_the_file(run_copy):
    file = checkpoint_file(run_copy, 10)
    file.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError) as caught:
        open_run(run_copy).load_model(10)
    assert str(file) in str(caught.value)


def test_truncated_trainer_state_gives_a_checkpoint_error_naming_the_file(run_copy):
    file = checkpoint_file(run_copy, 10, "trainer.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])
    model = open_run(run_copy).load_model(10)
    with pytest.raises(CheckpointError) as caught:
        load_trainer_state(file.parent, make_optimizer(model))
    assert str(file) in str(caught.value)


def test_corrupt_trainer_json_gives_a_checkpoint_error_naming_the_file(run_copy):
    file = checkpoint_file(run_copy, 10, "trainer.json")
    file.write_text(file.read_text()[:20])
    model = open_run(run_copy).load_model(10)
    with pytest.raises(CheckpointError) as caught:
        load_trainer_state(file.parent, make_optimizer(model))
    assert str(file) in str(caught.value)


def test_checkpoint_of_a_different_shape_names_a_mismatched_tensor(run_copy):
    wider = build_model(ModelConfig(n_layers=2, n_heads=2, d_model=32, d_vocab=64, n_ctx=64))
    save_checkpoint(run_copy / "checkpoints" / "step_00000010", wider)
    with pytest.raises(CheckpointError) as caught:
        open_run(run_copy).load_model(10)
    message = str(caught.value)
    assert "W_E" in message  # (64, 32) in the file vs (64, 64) in the model
    assert "(64, 32)" in message and "(64, 64)" in message
    assert str(checkpoint_file(run_copy, 10)) in message


def test_checkpoint_of_a_different_depth_names_the_missing_tensors(tmp_path):
    save_checkpoint(tmp_path / "step", build_model(ModelConfig(n_layers=1, n_heads=2, d_model=16, d_vocab=11, n_ctx=8)))
    with pytest.raises(CheckpointError) as caught:
        load_weights(build_model(TINY), tmp_path / "step")
    assert "blocks.1." in str(caught.value)


def test_missing_step_names_the_available_steps(induction_run):
    with pytest.raises(CheckpointError) as caught:
        open_run(induction_run).load_model(15)
    message = str(caught.value)
    assert "15" in message and "0, 10, 20" in message
