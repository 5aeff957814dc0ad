"""One device rule, `auto|cpu|cuda|cuda:N|mps`, for train, probe and import-hf: a device this machine lacks
is refused with a message naming the key or flag that asked for it, the same way everywhere."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from phaselens.cli import app as cli
from phaselens.errors import ConfigError
from phaselens.models.device import check_device, resolve_device
from phaselens.training.config import load_config
from phaselens.training.trainer import train

TINY = ["train.steps=2", "train.checkpoint_every=2", "telemetry.every=2"]
CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_cpu_and_auto_are_accepted_and_auto_prefers_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if CUDA_DEVICES else "cpu")
    assert [check_device(name) for name in ("cuda", "cuda:0", "cuda:12", "mps")] == ["cuda", "cuda:0", "cuda:12", "mps"]
    with pytest.raises(ConfigError, match="got 'cuda:'"):
        check_device("cuda:")


@pytest.mark.parametrize("name", ["cuda:abc", "gpu", "CUDA", "cuda:-1", "cuda:1.5", "cpu:0"])
def test_a_name_outside_the_rule_is_refused_naming_the_flag_or_the_key(name):
    with pytest.raises(ConfigError, match=r"--device must be one of auto\|cpu\|cuda\|cuda:N\|mps"):
        resolve_device(name)
    with pytest.raises(ConfigError, match=r"train\.device must be one of auto\|cpu\|cuda\|cuda:N\|mps"):
        load_config("induction", [f"train.device={name}"])


@pytest.mark.skipif(CUDA_DEVICES > 7, reason="this machine has a cuda:7")
def test_a_gpu_number_the_machine_does_not_have_is_refused():
    with pytest.raises(ConfigError) as refused:
        resolve_device("cuda:7")
    message = str(refused.value)
    assert message.startswith("--device cuda:7: ") and "use --device cpu or --device auto" in message
    assert ("this machine has" if CUDA_DEVICES else "no CUDA device") in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"^--device cuda: no CUDA device is available here"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_an_apple_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"^--device mps: no MPS \(Apple GPU\) device is available here"):
        resolve_device("mps")


@pytest.mark.skipif(CUDA_DEVICES > 7, reason="this machine has a cuda:7")
def test_training_refuses_a_missing_gpu_by_its_config_key_before_writing_anything(tmp_path):
    config = load_config("induction", [*TINY, "train.device=cuda:7"])  # the name is valid: checked without torch
    with pytest.raises(ConfigError, match=r"^train\.device=cuda:7: .*use train\.device=cpu or train\.device=auto"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(CUDA_DEVICES > 1, reason="this machine has a cuda:1")
def test_probe_reads_cuda_n_as_training_does(induction_run):
    """`phaselens probe --device cuda:1` is the rule's cuda:N, refused for the missing GPU, not for its name."""
    result = CliRunner().invoke(cli, ["probe", str(induction_run), "--device", "cuda:1"])
    assert result.exit_code == 2 and "--device cuda:1: " in result.stderr and "must be one of" not in result.stderr
    result = CliRunner().invoke(cli, ["probe", str(induction_run), "--device", "cuda:abc"])
    assert result.exit_code == 2 and "--device must be one of auto|cpu|cuda|cuda:N|mps" in result.stderr


@pytest.mark.skipif(CUDA_DEVICES > 7, reason="this machine has a cuda:7")
def test_the_dashboard_loads_checkpoints_where_it_is_told_and_refuses_a_missing_gpu(tmp_path):
    from phaselens.server import build

    dashboard, _ = build([], device="cpu")
    assert dashboard.state.session.device == "cpu"
    with pytest.raises(ConfigError, match=r"^device=cuda:7: "):
        build([], device="cuda:7")
    result = CliRunner().invoke(cli, ["serve", "--device", "cuda:abc"])
    assert result.exit_code == 2 and "--device must be one of" in result.stderr
