"""Checkpoints in safetensors, written atomically, with everything an exact resume needs.

    step_00001000/model.safetensors     model weights
    step_00001000/trainer.safetensors   optimizer tensors and RNG states (as uint8)
    step_00001000/trainer.json          step, optimizer param groups, non-tensor state

A checkpoint is written into a temporary sibling directory and renamed into place, so a
reader never sees half of one. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from phaselens.errors import CheckpointError
from phaselens.store.run_dir import CHECKPOINT_FILES


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint directory atomically (temp dir + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = dict(meta or {})
        if optimizer is not None:
            state = optimizer.state_dict()
            scalars: dict[str, dict[str, Any]] = {}
            for index, entry in state["state"].items():
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
                    else:
                        scalars.setdefault(str(index), {})[key] = value
            info["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars}
        for name, value in (rng or {}).items():
            tensors[f"rng.{name}"] = value.contiguous().cpu()
        save_file(tensors, str(tmp / "trainer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(info, indent=2))
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:  # a full disk, Ctrl-C, SIGTERM: no half-written temp dir is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # re-saving a step (a run resumed from it): move the old one aside first
        foreign = sorted(set(os.listdir(path)) - CHECKPOINT_FILES) if path.is_dir() and not path.is_symlink() else [path.name]
        if foreign:  # the old one is deleted below: only when phaselens wrote everything in it
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{path} holds files phaselens did not write ({', '.join(foreign[:5])}); "
                                  "move them out before this step is saved again")
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated ({exc}); delete it or resume from an earlier step") from exc


def state_dict_problems(
    model: torch.nn.Module, state: dict[str, torch.Tensor], show: int = 5, expected: dict[str, torch.Tensor] | None = None
) -> str:
    """How `state` fails to fit `model` (whose `state_dict()` the caller may pass as `expected`): missing and
    unexpected keys, shape mismatches (at most `show` of each); "" when it fits."""

    def first(items: list[str]) -> str:
        return f"{items[:show]}{' ...' if len(items) > show else ''}"

    expected = model.state_dict() if expected is None else expected
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {first(unexpected)}")
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:show]))
    return ", ".join(problems)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load `path/model.safetensors` into `model`, refusing missing, unexpected or mis-shaped tensors."""
    file = Path(path) / "model.safetensors"
    weights = _load_tensors(file)
    own = model.state_dict()  # the model's own tensors (detached, same storage)
    problems = state_dict_problems(model, weights, expected=own)
    if problems:
        raise CheckpointError(f"{file} does not match the model: {problems}")
    broken = [name for name, tensor in weights.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:  # measured, such weights give NaN for most values, silently: refuse them as a truncated file is refused
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise CheckpointError(f"{file} holds NaN or infinite weights ({shown}): the model there is unusable (training "
                              "diverged before it was saved, or the file was damaged); delete it or use an earlier step")
    with torch.no_grad():  # what load_state_dict does for these plain modules, without its per-module walk
        for name, tensor in own.items():
            tensor.copy_(weights[name])


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore the optimizer from a checkpoint; returns (trainer.json contents, RNG states)."""
    path = Path(path)
    tensors = _load_tensors(path / "trainer.safetensors")
    if not (path / "trainer.json").is_file():  # missing, or a FIFO that would block the read forever
        raise CheckpointError(f"{path / 'trainer.json'} is missing or not a regular file")
    try:
        info = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / 'trainer.json'} is missing or corrupt ({exc})") from exc
    saved = info.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{path} has no optimizer state; it cannot be resumed from")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in saved["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = saved["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not match the model ({exc})") from exc
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return info, rng
