"""Live telemetry while training a Hugging Face model: the README loops, run as written (fewer steps).

A plain loop on a `TransformerBridge` of a tiny GPT-2, checked against the metric formulas on
the model's own attentions, and a two-process gloo `torch.distributed` job in which only rank 0
writes.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import phaselens as pl
from phaselens.probes.heads import detection_patterns

README = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "own-training-loop.md"  # the loops' page
STEPS = 3


def readme_block(marker: str) -> str:
    return next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if marker in b)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 4-head GPT-2 with random weights and no dropout, saved the way Hugging Face saves models."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def expected_rows(attentions: tuple[torch.Tensor, ...], logits: torch.Tensor, tokens: torch.Tensor) -> dict:
    """(probe, metric, layer, head) -> value, straight from the formulas on one forward's attentions and logits."""
    expected = {}
    detections = detection_patterns(tokens)
    for layer, pattern in enumerate(attentions):  # (B, H, T, T) each
        per_head = {"entropy": pl.attention_entropy(pattern), "coherence": pl.attention_coherence(pattern)}
        per_head.update({name: pl.head_score(pattern, detections[name]) for name in ("induction", "prev_token", "duplicate")})
        for metric, values in per_head.items():
            probe = "attention" if metric in ("entropy", "coherence") else "heads"
            for head, value in enumerate(values.tolist()):
                expected[(probe, metric, layer, head)] = value
    expected[("loss", "all", None, None)] = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    return expected


def test_telemetry_on_a_bridge_gives_the_formulas_on_the_models_own_attentions(gpt2_dir):
    """The README loop on a bridge; a plain HF twin trained in lockstep gives the reference attentions."""
    from transformers import GPT2LMHeadModel

    code = readme_block("TransformerBridge.boot_transformers(\"models/tiny-gpt2\"")
    namespace: dict = {}
    exec(code.replace("models/tiny-gpt2", str(gpt2_dir)).replace("range(200)", f"range({STEPS})"), namespace)
    frame = namespace["frame"]
    assert sorted(frame["step"].unique()) == list(range(STEPS)) and set(frame["source"]) == {"live"}

    twin = GPT2LMHeadModel.from_pretrained(gpt2_dir, attn_implementation="eager")  # the model's own attentions
    twin.train()
    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    rng = torch.Generator().manual_seed(0)  # the README's batches, drawn again
    for step in range(STEPS):
        tokens = torch.randint(0, 64, (8, 32), generator=rng)
        output = twin(tokens, output_attentions=True)
        with torch.no_grad():
            expected = expected_rows(output.attentions, output.logits, tokens)
        rows = frame[frame["step"] == step]
        got = {(r.probe, r.metric, None if pd_na(r.layer) else int(r.layer), None if pd_na(r.head) else int(r.head)): r.value
               for r in rows.itertuples()}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), (step, key)
        loss = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The values move with training: step 2's loss is not step 0's.
    loss_rows = frame[frame["probe"] == "loss"].set_index("step")["value"]
    assert loss_rows[2] < loss_rows[0]


def pd_na(value) -> bool:
    import pandas as pd

    return value is None or value is pd.NA


def test_telemetry_on_another_rank_installs_no_hooks_and_writes_nothing(gpt2_dir, tmp_path, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(str(gpt2_dir), device="cpu")
    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second process
    store = tmp_path / "metrics.sqlite"
    with pl.Telemetry(model, probes=["attention", "loss"], store=store) as telemetry:
        assert telemetry.rank == 1 and not telemetry.is_due(0)
        assert not model.hook_dict["blocks.0.attn.hook_pattern"].fwd_hooks
        tokens = torch.randint(0, 64, (2, 16))
        with telemetry.step(0, tokens):
            model(tokens)
        assert telemetry.dataframe().empty
    assert not list(tmp_path.iterdir())  # not even the store's schema


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, code: str, port: int, out: str) -> None:
    """One process of the README's torch.distributed loop; it saves the losses it trained on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    namespace: dict = {"losses": []}
    exec(code, namespace)
    torch.save({"losses": namespace["losses"], "rank": namespace["telemetry"].rank}, f"{out}/rank{rank}.pt")


def test_distributed_loop_on_two_gloo_processes_writes_only_rank_zeros_rows(tmp_path):
    import torch.multiprocessing as mp

    store = tmp_path / "runs" / "ddp" / "metrics.sqlite"
    code = (readme_block("init_process_group").replace("runs/ddp/metrics.sqlite", str(store))
            .replace("range(200)", f"range({STEPS})")
            .replace("optimizer.zero_grad(); loss.backward()", "losses.append(loss.item()); optimizer.zero_grad(); loss.backward()"))
    # spawn, not fork: a fork of this process copies the threads earlier tests left running (torch's
    # pools, background writers) in whatever lock state they held, and the workers hung in CI
    mp.start_processes(_ddp_worker, args=(code, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own data
    with sqlite3.connect(store) as conn:
        stored = conn.execute("SELECT step, value FROM metrics WHERE probe = 'loss' AND metric = 'all' ORDER BY step").fetchall()
        entropy = conn.execute("SELECT COUNT(*) FROM metrics WHERE metric = 'entropy'").fetchone()[0]
    assert [s for s, _ in stored] == list(range(STEPS)) and entropy == STEPS * 2 * 2  # layers x heads
    # Rank 0's own loss on its own shard, never rank 1's: nothing was overwritten.
    assert [v for _, v in stored] == pytest.approx(ranks[0]["losses"], abs=1e-5)
    assert {p.name for p in store.parent.iterdir()} <= {"metrics.sqlite", "metrics.sqlite-wal", "metrics.sqlite-shm"}
