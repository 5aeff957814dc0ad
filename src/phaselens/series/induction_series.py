"""A small GPT-NeoX trained here on the induction task, saved as `step{N}` revisions (offline; tests use it).

    MODEL_DIR/step0/     config.json, model.safetensors, tokenizer files
    MODEL_DIR/step100/   the same model after 100 AdamW updates
    ...

The model is what forms an induction head quickly on a CPU: 2 layers, d_model 64, 2 heads, an
8-wide MLP (wide MLPs delay the head by thousands of steps) and rotary embeddings on every
dimension of a head. Its tokenizer names the 64 token ids `t0` … `t63` (plus the ids of the
special tokens), so `phaselens import-hf` can tokenise a probe text written in them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

VOCAB = 64
SEQ_LEN = 64


def induction_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer whose ids 2… are the words `t2` …; ids 0 and 1 are [UNK] and <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "<|endoftext|>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def probe_text(n_words: int = 4000, seed: int = 0, vocab: int = VOCAB) -> str:
    """Random words of the tokenizer's vocabulary: a probe text for `import-hf --text`."""
    import random

    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(2, vocab)}" for _ in range(n_words))


def save_induction_series(
    model_dir: str | Path,
    steps: Sequence[int] = tuple(range(0, 1401, 100)),
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    d_mlp: int = 8,
    progress: bool = False,
) -> Path:
    """Train a 2-layer GPT-NeoX on the induction task (vocab 64, context 64) and save revision `step{s}` for each s.

    Args:
        steps: the revisions to save (the model after s AdamW updates).
        d_mlp: the MLP width (8: a layer-1 head's induction score goes from ~0.05 to ~0.8 between
            steps 600 and 1,000 at lr 1e-3, seed 0).
    """
    import torch
    import transformers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from phaselens.progress import progress_bar
    from phaselens.tasks.induction import InductionTask

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=d_mlp,
                           max_position_embeddings=SEQ_LEN, rotary_pct=1.0, bos_token_id=1, eos_token_id=1,
                           tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    task = InductionTask(seq_len=SEQ_LEN, vocab=VOCAB)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = induction_tokenizer()
    done = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # at this size a second thread only adds synchronisation (20x slower on a busy machine)
    try:
        with progress_bar("induction series", max(steps), unit="steps", enabled=progress) as update:
            for step in sorted(steps):
                while done < step:
                    tokens = task.sample(batch_size, generator).tokens  # (B, T)
                    loss = model(input_ids=tokens, labels=tokens).loss
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    done += 1
                    update(advance=1)
                model.save_pretrained(model_dir / f"step{step}")
                tokenizer.save_pretrained(model_dir / f"step{step}")
    finally:
        torch.set_num_threads(threads)
    return model_dir
