"""Local GPT-NeoX checkpoint series, to try `import-hf` offline (tests and benchmarks use them).

    MODEL_DIR/step0/    config.json, model.safetensors, tokenizer files
    MODEL_DIR/step100/  the same model after 100 updates on the text
    ...

`save_toy_series` trains a tiny model (tests); `save_pythia70m_series` saves revisions of a model
with Pythia-70m's shape (6 layers, d_model 512, 8 heads, d_mlp 2048, rotary on 25% of each head,
untied unembedding, context 2048), each the previous one plus seeded noise, for benchmarks at
the size a public series has. The tokenizer is a word-level one fitted to the text itself, so
nothing is downloaded; the vocabulary is the size that tokenizer gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def toy_tokenizer(text: str):
    """A word-level `PreTrainedTokenizerFast` fitted to the words of `text`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(text.splitlines(), trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_toy_series(
    model_dir: str | Path,
    text: str,
    steps: Sequence[int] = (0, 25, 50, 100, 200),
    train: bool = True,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    d_vocab: int = 0,
    seq_len: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Save revisions `step{s}` of a GPT-NeoX model under `model_dir`.

    Args:
        train: True saves the model after s AdamW updates on crops of `text` (one run, so the
            revisions form a real training series); False saves a fresh seeded initialisation per
            revision (quick, for memory benchmarks).
        d_vocab: the embedding size (0: the tokenizer's size; larger pads it, as Pythia does).
    """
    import torch
    import transformers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    tokenizer = toy_tokenizer(text)
    vocab = max(d_vocab, len(tokenizer))
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                           intermediate_size=4 * d_model, max_position_embeddings=max(64, seq_len), rotary_pct=0.25,
                           bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # (N,)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    done = 0
    for step in sorted(steps):
        if not train:
            torch.manual_seed(seed + step)
            model = GPTNeoXForCausalLM(config)
        while train and done < step:
            starts = torch.randint(0, len(ids) - seq_len, (8,), generator=generator)
            batch = ids[starts[:, None] + torch.arange(seq_len)]  # (8, seq_len)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
        model.save_pretrained(model_dir / f"step{step}")
        tokenizer.save_pretrained(model_dir / f"step{step}")
    return model_dir


PYTHIA_70M_SHAPE = {"d_model": 512, "n_layers": 6, "n_heads": 8, "n_ctx": 2048}


def save_pythia70m_series(
    model_dir: str | Path,
    text: str,
    steps: Sequence[int],
    drift: float = 0.01,
    seed: int = 0,
) -> Path:
    """Save revisions `step{s}` of one Pythia-70m-shaped GPT-NeoX under `model_dir` (safetensors, no training).

    The first revision is a seeded initialisation; each later one adds Gaussian noise of standard
    deviation `drift` × each tensor's own standard deviation, so consecutive revisions differ a
    little, as a training series' do, and no two are byte-identical.
    """
    import torch
    import transformers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    tokenizer = toy_tokenizer(text)
    shape = PYTHIA_70M_SHAPE
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=shape["d_model"], num_hidden_layers=shape["n_layers"],
                           num_attention_heads=shape["n_heads"], intermediate_size=4 * shape["d_model"],
                           max_position_embeddings=shape["n_ctx"], rotary_pct=0.25, bos_token_id=1, eos_token_id=1,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for index, step in enumerate(sorted(steps)):
        if index:
            with torch.no_grad():
                for param in model.parameters():
                    noise = torch.randn(param.shape, generator=generator)
                    param.add_(noise * (drift * float(param.std()) if param.numel() > 1 else drift))
        model.save_pretrained(model_dir / f"step{step}")
        tokenizer.save_pretrained(model_dir / f"step{step}")
    return model_dir
