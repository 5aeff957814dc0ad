"""The one device rule of train, probe, import-hf, serve and llc-calibrate: `auto|cpu|cuda|cuda:N|mps`.

`auto` is CUDA when present, else the CPU. A device this machine does not have is refused with a
message naming the config key or command-line flag that asked for it (`train.device`, `--device`).
`check_device` reads the name only (torch-free, for config validation); `resolve_device` also asks
torch what the machine has, importing it on first use.
"""

from __future__ import annotations

import re

from phaselens.errors import ConfigError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _setting(key: str, value: str) -> str:
    """How a user writes `key` = `value`: `--device cpu` for a flag, `train.device=cpu` for a config key."""
    return f"{key} {value}" if key.startswith("-") else f"{key}={value}"


def check_device(name: str | None, key: str = "--device") -> str:
    """`name` (None: auto) if it is one of auto|cpu|cuda|cuda:N|mps; ConfigError naming `key` otherwise."""
    name = "auto" if name is None else name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{key} must be one of {DEVICE_CHOICES} (N a GPU index), got {name!r}")
    return name


def resolve_device(name: str | None, key: str = "--device"):
    """The `torch.device` that `name` asks for (None: auto), refused with a ConfigError naming `key`
    when the machine does not have it (no CUDA, no GPU number N, no MPS)."""
    import torch

    name = check_device(name, key)
    fallback = f"use {_setting(key, 'cpu')} or {_setting(key, 'auto')}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{_setting(key, name)}: no CUDA device is available here ({fallback})")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{_setting(key, name)}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1} ({fallback})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{_setting(key, name)}: no MPS (Apple GPU) device is available here ({fallback})")
    return device
