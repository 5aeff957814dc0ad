"""`phaselens export RUN --format hf-series`: a run's checkpoints as a Hugging Face checkpoint series.

    OUT/README.md        model card: YAML front matter (phaselens version, task, the run's config), then
                         the revisions, the run's detected transitions and developmental stages
    OUT/step0/           config.json, model.safetensors, tokenizer files (one saved model per checkpoint)
    OUT/step100/         ...
    OUT/probe_text.txt   token-id models only: the run's probe sequences as text the exported tokenizer reads

This is the layout `phaselens import-hf OUT --revisions all` reads (and what `from_pretrained("OUT/step100")`
loads). Runs whose checkpoints reference Hugging Face models (`import-hf`, `pl.TelemetryCallback`) save
each referenced revision again; a run of phaselens's own transformer is written as GPT-2
(`phaselens.export.gpt2`: the same forward, checked on the run's probe batch); BDH has no Hugging Face
architecture and is refused.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phaselens.errors import CheckpointError, ConfigError, RunError
from phaselens.export.gpt2 import LOGIT_TOLERANCE, gpt2_refusal, to_gpt2, verify_logits
from phaselens.models.config import ModelConfig
from phaselens.models.hf import read_reference
from phaselens.run import Run
from phaselens.store.run_record import versions

CARD = "README.md"
PROBE_TEXT = "probe_text.txt"
TRANSITIONS_SHOWN = 12
VERIFY_SEQUENCES = 8  # probe sequences each GPT-2 export is checked on


@dataclass
class HFSeriesExport:
    """What an export wrote: one `step{N}` folder per checkpoint under `out`, and the model card."""

    out: Path
    architecture: str
    revisions: dict[int, str] = field(default_factory=dict)  # step -> folder name
    card: Path | None = None
    probe_text: Path | None = None  # where the exported tokenizer reads only token ids
    notes: list[str] = field(default_factory=list)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a new or empty directory for the series")
    if out.is_dir() and any(out.iterdir()):  # never write among the user's files
        shown = ", ".join(sorted(entry.name for entry in out.iterdir())[:5])
        raise RunError(f"--out {out} is not empty ({shown}); choose a new or empty directory for the series")


def export_hf_series(run: Run, out: Path | str, progress: bool = False) -> HFSeriesExport:
    """Write every checkpoint of `run` as `out/step{N}`, a saved Hugging Face model, with a model card."""
    import transformers

    from phaselens.progress import progress_bar

    transformers.utils.logging.disable_progress_bar()  # one bar: ours
    out = Path(out)
    kind = run.spec.kind
    if kind not in ("transformer", "hf"):
        raise ConfigError(f"a {kind} model has no Hugging Face architecture to save it as (BDH's sparse positive "
                          "neurons and linear attention are no transformers model); export its metrics with "
                          "--format csv or --format tensorboard" if kind == "bdh" else
                          f"model.kind={kind} has no Hugging Face form phaselens knows; export its metrics instead")
    reason = gpt2_refusal(run.spec) if isinstance(run.spec, ModelConfig) else None
    if reason:
        raise ConfigError(f"this run's transformer has no exact Hugging Face (GPT-2) form: {reason}")
    steps = run.checkpoint_steps()
    if not steps:
        raise CheckpointError(f"{run.dir.checkpoints} holds no checkpoints to export")
    _check_out(out)
    writer = _ReferenceWriter(run) if kind == "hf" else _GPT2Writer(run)
    result = HFSeriesExport(out=out, architecture=writer.architecture)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with progress_bar("exporting checkpoints", len(steps), unit="revisions", enabled=progress) as update:
            for step in steps:
                folder = out / f"step{step}"
                partial = out / f".step{step}.partial"  # renamed into place when whole, so a reader never sees half of one
                shutil.rmtree(partial, ignore_errors=True)
                writer.save(step, partial)
                partial.rename(folder)
                result.revisions[step] = folder.name
                update(advance=1)
    except BaseException:  # a refused or interrupted export leaves no half series (out was new or empty: all of it is ours)
        for name in [*result.revisions.values(), *(f".step{s}.partial" for s in steps)]:
            shutil.rmtree(out / name, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    result.notes += writer.notes
    result.probe_text = writer.write_probe_text(out)
    result.card = out / CARD
    result.card.write_text(model_card(run, result))
    return result


class _ReferenceWriter:
    """Checkpoints that reference Hugging Face revisions: each revision loaded with transformers and saved again."""

    def __init__(self, run: Run):
        self.run = run
        self.notes: list[str] = []
        self.architecture = str(run.config["model"].get("architecture") or "Hugging Face model")

    def save(self, step: int, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = read_reference(self.run.dir.checkpoint(step))
        where = str(Path(ref["source"]) / ref["revision"]) if ref.get("local") else ref["source"]
        revision = None if ref.get("local") else ref["revision"]
        try:
            model = AutoModelForCausalLM.from_pretrained(where, revision=revision)
        except Exception as exc:  # transformers raises OSError, ValueError, ... for missing or bad weights
            raise CheckpointError(f"cannot load revision {ref['revision']!r} of {ref['source']} (step {step}): "
                                  f"{type(exc).__name__}: {exc}") from exc
        model.save_pretrained(folder)
        try:
            AutoTokenizer.from_pretrained(where, revision=revision).save_pretrained(folder)
        except (OSError, ValueError):
            self.notes.append(f"step {step}: {where} has no tokenizer; import-hf needs one beside each revision")

    def write_probe_text(self, out: Path) -> Path | None:
        return None


class _GPT2Writer:
    """phaselens transformer checkpoints as GPT-2, with a tokenizer for the run's ids or bytes."""

    architecture = "GPT2LMHeadModel"

    def __init__(self, run: Run):
        from phaselens.models.adapter import adapter_for

        self.run = run
        self.notes: list[str] = []
        self.tokens = run.probe_batch().tokens[:VERIFY_SEQUENCES]  # (B, T)
        self.tokenizer_kind = adapter_for(run.load_model(run.checkpoint_steps()[0])).tokenizer.kind

    def save(self, step: int, folder: Path) -> None:
        model = self.run.load_model(step, device="cpu").float()
        hf = to_gpt2(model)
        gap = verify_logits(model, hf, self.tokens)
        if not gap <= LOGIT_TOLERANCE:
            raise CheckpointError(f"step {step}: the GPT-2 form's logits differ from the run's by {gap:.2g} on its probe "
                                  f"batch (more than {LOGIT_TOLERANCE:g}); not exported")
        hf.save_pretrained(folder)
        id_tokenizer(model.cfg.d_vocab, self.tokenizer_kind).save_pretrained(folder)

    def write_probe_text(self, out: Path) -> Path | None:
        """The run's probe sequences as id text, for `import-hf --text` (Hamlet means nothing to a model of ids)."""
        if self.tokenizer_kind == "bytes":
            return None
        path = out / PROBE_TEXT
        path.write_text("\n".join(" ".join(str(int(t)) for t in row) for row in self.run.probe_batch().tokens) + "\n")
        return path


def byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte 0..255 that byte-level BPE tokenizers use (GPT-2's scheme):
    printable Latin-1 bytes stand for themselves, the others for the code points from 256 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def id_tokenizer(d_vocab: int, kind: str) -> Any:
    """A Hugging Face tokenizer for a phaselens model: `bytes` maps each UTF-8 byte to its id; otherwise
    (`ids`) the words of a text are token ids ("12 7 31") and map to themselves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytes":
        core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_alphabet())}, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        core.decoder = decoders.ByteLevel()
    else:
        core = Tokenizer(models.WordLevel(vocab={str(i): i for i in range(d_vocab)}, unk_token="0"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        core.decoder = decoders.WordPiece(prefix="##")  # joins the ids with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core)


def model_card(run: Run, series: HFSeriesExport) -> str:
    """README.md of the series: YAML front matter (phaselens version, task, config), then a Markdown summary."""
    from phaselens.analysis.stages import run_stages
    from phaselens.signals.transitions import series_label

    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["phaselens", "checkpoint-series"],
             "phaselens": {"version": versions()["phaselens"], "run": run.name, "task": run.task,
                           "architecture": series.architecture, "steps": sorted(series.revisions), "config": run.config}}
    lines = [f"# {run.name}: {len(series.revisions)} checkpoints of a phaselens run", "",
             f"Task `{run.task}`; each revision `step{{N}}` is the model after N training steps, saved as a "
             f"`{series.architecture}`.", "",
             "```python", "from transformers import AutoModelForCausalLM",
             f"# this folder ({series.out.name}/) on disk; once pushed to the Hub: from_pretrained(\"ORG/NAME\", revision=\"step{max(series.revisions)}\")",
             f"model = AutoModelForCausalLM.from_pretrained(\"{series.out.name}/step{max(series.revisions)}\")", "```", "",
             f"Measure it again with `phaselens import-hf {series.out.name} --revisions all --out DIR"
             + (f" --text {series.out.name}/{PROBE_TEXT}" if series.probe_text else "") + "`.", ""]
    if series.architecture == "GPT2LMHeadModel":
        attention_only = not run.config["model"].get("d_mlp")
        lines += ["The unembedding bias of phaselens's transformer is folded into GPT-2's bias-free unembedding through "
                  "the final LayerNorm: logits, the logit lens and the loss are those of the run; `lm_head.weight` alone "
                  "is not the run's `W_U`." + (" The model is attention-only: each block carries a width-1 MLP that adds "
                                               "exactly zero." if attention_only else ""), ""]
    if series.probe_text:
        lines += [f"Its tokens are plain ids: the tokenizer reads text such as `12 7 31`; `{PROBE_TEXT}` holds the "
                  "run's probe sequences in that form.", ""]
    transitions = run.transitions()
    lines += ["## Transitions", ""]
    if len(transitions):
        shown = transitions.sort_values("strength", ascending=False).head(TRANSITIONS_SHOWN).sort_values("step")
        lines += ["| step | probe | series | window | before | after |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {int(r['step'])} | {r['probe']} | {series_label(r)} | {int(r['start'])}–{int(r['end'])} | "
                  f"{r['before']:.3g} | {r['after']:.3g} |" for _, r in shown.iterrows()]
        if len(transitions) > TRANSITIONS_SHOWN:
            lines.append(f"\nThe {TRANSITIONS_SHOWN} strongest of {len(transitions)} detected transitions.")
    else:
        lines.append("None detected (no probe measured a step change, or no probe has run: `phaselens probe RUN`).")
    stages, _ = run_stages(run.metrics(), transitions)
    lines += ["", "## Developmental stages", ""]
    if stages:
        lines += ["| stage | steps | LLC | transitions inside |", "| --- | --- | --- | --- |"]
        lines += [f"| {s.index} | {s.start}–{s.end} | {s.llc_trend} | {', '.join(s.transitions) or '–'} |" for s in stages]
    else:
        lines.append("Not measured: stages are cut on the LLC curve (`phaselens probe RUN --probes llc`).")
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines) + "\n"
