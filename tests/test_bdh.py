"""BDH: the forward pass is exactly the published equations, hook points per layer, checkpoint import."""

from __future__ import annotations

import math

import pytest
import torch

from phaselens.errors import CheckpointError, ConfigError
from phaselens.models import build_model
from phaselens.models.bdh_checkpoint import load_bdh_checkpoint
from phaselens.models.bdh_config import BDHConfig

TINY = dict(n_layers=2, d_model=8, n_heads=2, multiplier=2, d_vocab=256, n_ctx=10, dropout=0.0)  # N = 8 per head


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(BDHConfig(**TINY))
    with torch.no_grad():  # larger weights than the init, so every term matters numerically
        for p in model.parameters():
            p.normal_(std=0.5)
    return model.eval()


def layer_norm(v: torch.Tensor) -> torch.Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5)


def rotate(v: torch.Tensor, t: int) -> torch.Tensor:
    """RoPE of one vector (N,) at position t, pair by pair as written in the issue."""
    N = v.shape[0]
    out = torch.empty_like(v)
    for k in range(0, N, 2):
        frequency = (2.0**16) ** (-2 * (k // 2) / N) / (2 * math.pi)
        phase = ((t * frequency) % 1.0) * 2 * math.pi
        c, s = math.cos(phase), math.sin(phase)
        # v·cos + v_rot·sin with v_rot = (−v_odd, v_even) at (even, odd)
        out[k] = v[k] * c - v[k + 1] * s
        out[k + 1] = v[k + 1] * c + v[k] * s
    return out


def reference_forward(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The equations, one sequence, one position and one head at a time (float64)."""
    W = {k: v.detach().double() for k, v in model.state_dict().items()}
    nh, D = W["encoder"].shape[:2]
    N = W["encoder"].shape[2]
    B, T = tokens.shape
    logits = torch.zeros(B, T, 256, dtype=torch.float64)
    xy_all = {layer: torch.zeros(B, nh, T, N, dtype=torch.float64) for layer in range(TINY["n_layers"])}
    for b in range(B):
        x = torch.stack([layer_norm(W["embed.weight"][tokens[b, t]]) for t in range(T)])  # (T, D)
        for layer in range(TINY["n_layers"]):
            y_mlp = torch.zeros(T, D, dtype=torch.float64)
            for h in range(nh):
                x_sparse = torch.relu(x @ W["encoder"][h])  # (T, N)
                rotated = torch.stack([rotate(x_sparse[t], t) for t in range(T)])
                for t in range(T):
                    a = sum((rotated[t] @ rotated[s]) * x[s] for s in range(t)) if t else torch.zeros(D, dtype=torch.float64)
                    y_sparse = torch.relu(layer_norm(a) @ W["encoder_v"][h])  # (N,)
                    xy = x_sparse[t] * y_sparse
                    xy_all[layer][b, h, t] = xy
                    y_mlp[t] += xy @ W["decoder"][h * N:(h + 1) * N]
            x = layer_norm(x + layer_norm(y_mlp))
        logits[b] = x @ W["lm_head"]
    return logits, xy_all


def test_forward_equals_a_direct_computation_of_the_equations(tiny):
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, cache = tiny.run_with_cache(tokens)
    expected, xy = reference_forward(tiny, tokens)
    assert torch.allclose(logits.double(), expected, atol=1e-4, rtol=1e-4)
    for layer in range(2):
        assert torch.allclose(cache[f"blocks.{layer}.hook_xy_sparse"].double(), xy[layer], atol=1e-4, rtol=1e-4)


def test_attention_is_strictly_causal_and_the_first_position_sees_nothing(tiny):
    tokens = torch.randint(0, 256, (1, 8))
    _, cache = tiny.run_with_cache(tokens)
    changed = tokens.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 256
    _, after = tiny.run_with_cache(changed)
    attn = "blocks.0.hook_attn_out"
    assert torch.allclose(cache[attn][..., :5, :], after[attn][..., :5, :])  # the future is never read
    assert (cache[attn][..., 0, :] == 0).all()  # position 0 has no earlier key
    # strictly before: position 1 reads only position 0's value, x_0 = ln(embed(token_0))
    x0 = torch.nn.functional.layer_norm(cache["hook_embed"][0, 0], (8,))
    out = cache[attn][0, :, 1, :]  # (nh, D)
    assert torch.allclose(out, (out @ x0 / (x0 @ x0))[:, None] * x0, atol=1e-5)


def test_hook_points_per_layer_with_documented_shapes(tiny):
    tokens = torch.randint(0, 256, (3, 10))
    logits, cache = tiny.run_with_cache(tokens)
    assert logits.shape == (3, 10, 256)
    assert cache["hook_embed"].shape == (3, 10, 8)
    for layer in range(2):
        for name in ("x_sparse", "y_sparse", "xy_sparse"):
            act = cache[f"blocks.{layer}.hook_{name}"]
            assert act.shape == (3, 2, 10, 8) and (act >= 0).all()  # (B, nh, T, N), positive
        assert cache[f"blocks.{layer}.hook_attn_out"].shape == (3, 2, 10, 8)  # (B, nh, T, D)
        assert cache[f"blocks.{layer}.hook_resid_post"].shape == (3, 10, 8)
    # parameters are shared by the layers: only five tensors, whatever n_layers
    assert sorted(tiny.state_dict()) == ["decoder", "embed.weight", "encoder", "encoder_v", "lm_head"]
    # ablating a layer's product code through its hook changes the output
    ablated = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_xy_sparse", lambda a, hook: a * 0)])
    assert not torch.allclose(ablated, logits)


def test_bdh_config_refuses_bad_shapes_and_attention_probes():
    from phaselens.training.config import load_config

    with pytest.raises(ConfigError, match="n_heads"):
        BDHConfig(d_model=10, n_heads=3, multiplier=1).validate()
    with pytest.raises(ConfigError, match="telemetry.probes: probe 'attention'.*model.kind=bdh"):
        load_config("bdh_shakespeare_small", ["telemetry.probes=loss,attention"])
    with pytest.raises(ConfigError, match="attention-only"):
        load_config("induction", ["telemetry.checkpoint_probes=neurons"])


def save_reference_checkpoint(model, path, compiled=True, **changes):
    """A checkpoint as the authors' code would save it: reference names, a RoPE buffer, torch.compile prefixes."""
    state = {("_orig_mod." if compiled else "") + k: v for k, v in model.state_dict().items()}
    state[("_orig_mod." if compiled else "") + "attn.freqs"] = torch.zeros(1, 1, 1, 8)
    state.update(changes.pop("state", {}))
    config = {"n_layer": 2, "n_embd": 8, "n_head": 2, "mlp_internal_dim_multiplier": 2, "vocab_size": 256, "dropout": 0.1}
    config.update(changes)
    torch.save({"model": state, "config": config, "step": 3}, path)


def test_reference_checkpoint_loads_with_compile_prefix_stripped(tiny, tmp_path):
    save_reference_checkpoint(tiny, tmp_path / "bdh.pt")
    loaded = load_bdh_checkpoint(tmp_path / "bdh.pt")
    assert loaded.cfg.n_layers == 2 and loaded.cfg.n_neurons == 8
    tokens = torch.randint(0, 256, (2, 9))
    assert torch.allclose(loaded(tokens), tiny(tokens))


def test_checkpoint_mismatches_and_pickled_objects_get_clear_errors(tiny, tmp_path):
    path = tmp_path / "bad.pt"
    save_reference_checkpoint(tiny, path, state={"_orig_mod.lm_gate": torch.zeros(8, 1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['lm_gate'\]"):
        load_bdh_checkpoint(path)
    state = {k: v for k, v in tiny.state_dict().items() if k != "decoder"}
    torch.save({"model": state, "config": {"n_layer": 2}}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['decoder'\]"):
        load_bdh_checkpoint(path)
    state = dict(tiny.state_dict(), lm_head=torch.zeros(8, 100))
    torch.save({"model": state, "config": {"n_layer": 2}}, path)
    with pytest.raises(CheckpointError, match=r"lm_head: checkpoint \(8, 100\) vs model \(8, 256\)"):
        load_bdh_checkpoint(path)
    torch.save({"model": tiny.state_dict(), "config": BDHConfig(**TINY)}, path)  # a dataclass: pickled code
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_bdh_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_bdh_checkpoint(path)
