"""`pl.TelemetryCallback`: live telemetry and a phaselens run directory for a `transformers.Trainer`.

    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[pl.TelemetryCallback("runs/my-run")])
    trainer.train()

The probes read the Trainer's own training forward: at each measured step, the first forward
is asked for its attention patterns (`output_attentions=True`, which needs eager attention)
and its logits, so no extra forward runs. The run's checkpoints are references to the
Trainer's checkpoint folders (`output_dir/checkpoint-N`), which `phaselens probe`, `report`
and `serve` boot through TransformerLens's `TransformerBridge`. In a distributed job only the
world's process zero measures and writes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from phaselens.errors import ConfigError, RunError
from phaselens.models.adapter import HFTokenizer, adapter_for
from phaselens.probes.base import Probe
from phaselens.probes.live import Telemetry
from phaselens.store.atomic import write_json
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import ImportedSeries, RunRecord, TrainerOrigin, timestamp, versions
from phaselens.store.unigram import unigram_path, write_unigram_counts
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.induction import INDUCTION_SEED_OFFSET, PROBE_MIN_SEQ_LEN, induction_probe_batch

PATTERN = "blocks.{}.attn.hook_pattern"  # the only activation a Hugging Face forward returns per layer
UNIGRAM_SEQUENCES = 10_000  # token counts for `kl_unigram`: the first this many sequences of the dataset
IGNORE_INDEX = -100  # labels Hugging Face losses skip


class _ForwardTelemetry(Telemetry):
    """Telemetry fed by a Hugging Face model's forward outputs (attentions and logits) instead of hook points."""

    def _install_hooks(self) -> None:
        adapter = adapter_for(self.model)
        self.n_layers, self.n_heads = adapter.n_layers, adapter.n_heads
        check_live_probes(self.probes, adapter)
        self._wants_patterns = any(probe.hook_names(adapter) for probe in self.probes)
        self._armed_step: int | None = None
        self._batch: TaskBatch | None = None
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))

    def arm(self, step: int) -> None:
        """Measure the next training forward as step `step` (when due)."""
        self._armed_step = step if self.is_due(step) else None

    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._armed_step is None or not module.training:  # evaluation forwards are not training steps
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            return None
        self._batch = _task_batch(tokens, kwargs.get("labels"), kwargs.get("attention_mask"))
        if self._wants_patterns:
            kwargs = {**kwargs, "output_attentions": True}
        return args, kwargs

    def _after_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._armed_step is None or self._batch is None:
            return
        step, batch = self._armed_step, self._batch
        self._armed_step, self._batch = None, None  # later micro-batches of the step are not measured
        attentions = getattr(output, "attentions", None) or ()
        if self._wants_patterns and len(attentions) != self.n_layers:
            raise RuntimeError(f"the model returned {len(attentions)} attention patterns for {self.n_layers} layers; "
                               "attention patterns need eager attention (attn_implementation='eager')")
        self._acts = {PATTERN.format(layer): pattern for layer, pattern in enumerate(attentions)}  # (B, H, T, T) each
        self._logits = getattr(output, "logits", None)  # (B, T, vocab)
        self._record(step, batch, None)


def check_live_probes(probes: Sequence[str | Probe], adapter: Any) -> None:
    """Refuse probes that read activations a Hugging Face forward does not return (before anything is written)."""
    from phaselens.probes.base import make_probe

    import phaselens.probes  # noqa: F401  (registers the built-in probes)
    from phaselens.probes.plan import model_refusal

    available = {PATTERN.format(layer) for layer in range(adapter.n_layers)}
    for probe in (make_probe(p) for p in probes):
        unread = sorted(set(probe.hook_names(adapter)) - available)
        refused = model_refusal(probe, adapter.offers, adapter.kind, "live")  # circuits: no graph of the Trainer's own model
        if refused:
            raise ConfigError(f"{refused} in the Trainer's forward; measure it on the checkpoints (booted through "
                              f"TransformerBridge) with `phaselens probe RUN --probes {probe.name}`")
        if unread:
            raise ConfigError(f"probe {probe.name!r} reads {unread[:2]}{' ...' if len(unread) > 2 else ''}; a Trainer's "
                              "forward returns only attention patterns and logits. Measure it on the checkpoints "
                              f"with `phaselens probe RUN --probes {probe.name}`")


def _task_batch(tokens: torch.Tensor, labels: Any, attention_mask: Any) -> TaskBatch:
    """The measured batch: every prediction the Trainer's loss counts (labels -100 and padding are left out)."""
    counted = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=tokens.device)  # (B, T-1)
    if isinstance(labels, torch.Tensor) and labels.shape == tokens.shape:
        counted &= labels[:, 1:] != IGNORE_INDEX
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == tokens.shape:
        counted &= attention_mask[:, 1:].bool()
    return TaskBatch(tokens=tokens.detach(), loss_mask=counted)


class TelemetryCallback(TrainerCallback):
    """Writes a phaselens run directory while a `transformers.Trainer` trains.

    Args:
        out: the run directory (created; a directory holding another run is refused).
        probes: live probes; they may read attention patterns, logits and the batch
            (default: attention, heads, loss). Others run post-hoc with `phaselens probe`.
        every: measure every `every` optimizer steps.
        flush_every: write rows to metrics.sqlite every this many measured steps.
        probe_size: sequences of the train dataset kept as the run's probe batch.
        name: the run's name (default: the directory's name).
    """

    def __init__(self, out: str | Path, probes: Sequence[str | Probe] = ("attention", "heads", "loss"), every: int = 1,
                 flush_every: int = 100, probe_size: int = 16, name: str | None = None):
        if every < 1 or probe_size < 1:
            raise ConfigError(f"every and probe_size must be >= 1, got every={every}, probe_size={probe_size}")
        self.run = RunDir(out)
        self.probes, self.every, self.flush_every, self.probe_size = list(probes), every, flush_every, probe_size
        self.name = name or self.run.path.name
        self.telemetry: _ForwardTelemetry | None = None
        self._output_dir: Path | None = None

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                       train_dataloader: Any = None, processing_class: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ConfigError("TelemetryCallback needs the Trainer's model")
        adapter = adapter_for(model)
        check_live_probes(self.probes, adapter)
        self._output_dir = Path(args.output_dir).resolve()  # type: ignore[arg-type]  # the Trainer sets it before training
        resuming = self._open_run(state.global_step)
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            model.set_attn_implementation("eager")  # sdpa and flash attention return no patterns
        self.telemetry = _ForwardTelemetry(model, probes=self.probes, store=self.run.metrics_db, every=self.every,
                                           flush_every=self.flush_every)
        if not resuming:
            self._write_run(args, state, model, train_dataloader, processing_class)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.telemetry is not None:
            self.telemetry.arm(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.telemetry is None:
            return
        self.telemetry.flush()
        self._reference_checkpoints()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.telemetry is None:
            return
        try:
            self.telemetry.close()
        finally:
            self.telemetry = None
            self._reference_checkpoints()
            self.run.update(status="finished", steps_done=state.global_step, finished=timestamp())

    # ------------------------------------------------------------------ the run directory

    def _open_run(self, step: int) -> bool:
        """True when this is the same Trainer run resuming (its live rows from `step` on are measured again)."""
        if not self.run.exists():
            if self.run.path.exists() and any(self.run.path.iterdir()):
                raise RunError(f"{self.run.path} is not empty and holds no phaselens run; choose another directory")
            return False
        trainer = self.run.record().trainer
        if trainer is None or trainer.output_dir != str(self._output_dir) or step == 0:
            raise RunError(f"{self.run.path} already holds a run; give TelemetryCallback another directory")
        from phaselens.store.metrics import MetricsStore

        store = MetricsStore(self.run.metrics_db)
        try:
            store.delete_from_step(step)
        finally:
            store.close()
        self.run.update(status="running")
        return True

    def _write_run(self, args, state, model, train_dataloader, tokenizer) -> None:
        from phaselens.models.hf_config import HFModelConfig
        from phaselens.tasks.hf_trainer_config import HFTrainerData

        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None:
            raise ConfigError("TelemetryCallback needs the Trainer's train_dataset (its first sequences are the probe batch)")
        probe_batch = _probe_batch(dataset, self.probe_size)
        self.run.path.mkdir(parents=True, exist_ok=True)
        probe_batch.save(self.run.probe_batch)
        adapter = adapter_for(model)
        if tokenizer is not None:  # processing_class: the ids it never produces for text are left out
            adapter = adapter_for(model, tokenizer=HFTokenizer(tokenizer, adapter.d_vocab))
        if probe_batch.tokens.shape[1] >= PROBE_MIN_SEQ_LEN:  # shorter: heads reads the probe batch
            # heads, attention_to and patching read it post-hoc: random ordinary ids with a repeated segment
            generator = torch.Generator().manual_seed(int(args.seed) + INDUCTION_SEED_OFFSET)
            induction_probe_batch(adapter.tokenizer.ordinary_ids(), probe_batch.tokens.shape[1], len(probe_batch),
                                  generator).save(self.run.induction_batch)
        model_spec = HFModelConfig.of(adapter, source=str(self._output_dir), local=True)
        counts, counted = _token_counts(dataset, model_spec.d_vocab)
        write_unigram_counts(unigram_path(self.run.path), counts, f"tokens of the first {counted} sequences of the train dataset")
        data = HFTrainerData(probe_size=len(probe_batch), seq_len=probe_batch.tokens.shape[1],
                             dataset=f"{type(dataset).__name__} of {len(dataset)} sequences")
        world = max(1, int(getattr(args, "world_size", 1)))
        run_config = {
            "name": self.name,
            "model": asdict(model_spec),
            "data": asdict(data),
            "train": {"steps": int(state.max_steps), "lr": float(args.learning_rate), "weight_decay": float(args.weight_decay),
                      "batch_size": int(args.per_device_train_batch_size * world * args.gradient_accumulation_steps),
                      "grad_clip": float(args.max_grad_norm or 0.0), "seed": int(args.seed),
                      "checkpoint_every": int(args.save_steps) if float(args.save_steps).is_integer() else 0},
            "telemetry": {"every": self.every, "probes": [p if isinstance(p, str) else p.name for p in self.probes],
                          "rows": 0, "flush_every": self.flush_every},
        }
        self.run.write(RunRecord(
            name=self.name, status="running", config=run_config, versions=versions(), created=timestamp(),
            # the checkpoints are references to the Trainer's checkpoint folders, booted like an imported series
            imported=ImportedSeries(source=str(self._output_dir), local=True),
            trainer=TrainerOrigin(output_dir=str(self._output_dir), args=json.loads(args.to_json_string())),
        ))

    def _reference_checkpoints(self) -> None:
        """One `reference.json` per `output_dir/checkpoint-N` saved by the Trainer; those it has rotated away are dropped."""
        from phaselens.models.hf import REFERENCE_FILE

        assert self._output_dir is not None  # set when training began
        saved = {}
        for folder in self._output_dir.glob("checkpoint-*"):
            number = folder.name.removeprefix("checkpoint-")
            if number.isdigit() and (folder / "config.json").is_file():
                saved[int(number)] = folder.name
        for step in self.run.checkpoint_steps():
            if step not in saved:  # deleted by save_total_limit: remove the reference we wrote (and its folder, if empty)
                reference = self.run.checkpoint(step) / REFERENCE_FILE
                reference.unlink(missing_ok=True)
                if not any(reference.parent.iterdir()):
                    reference.parent.rmdir()
        for step, revision in saved.items():
            reference = self.run.checkpoint(step) / REFERENCE_FILE
            if not reference.is_file():
                write_json(reference, {"source": str(self._output_dir), "revision": revision, "local": True})
        record = self.run.record()
        assert record.imported is not None  # written at the start of training
        record.imported.revisions = {step: saved[step] for step in sorted(saved)}
        if saved:
            record.config["model"]["revision"] = record.model["revision"] = saved[max(saved)]
        self.run.write(record)


def _sequence(item: Any) -> torch.Tensor:
    ids = item["input_ids"] if isinstance(item, dict) else item
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)  # (T,)


def _probe_batch(dataset: Any, size: int) -> TaskBatch:
    """The first `size` sequences of `dataset`, cut to the shortest of them."""
    rows = [_sequence(dataset[i]) for i in range(min(size, len(dataset)))]
    if not rows:
        raise ConfigError("the Trainer's train_dataset is empty")
    length = min(len(row) for row in rows)
    if length < 2:
        raise ConfigError(f"the train_dataset's first sequences are too short for a probe batch ({length} token)")
    tokens = torch.stack([row[:length] for row in rows])  # (B, T)
    return TaskBatch.coerce(tokens)


def _token_counts(dataset: Any, vocab: int) -> tuple[list[int], int]:
    """Token counts of the first UNIGRAM_SEQUENCES sequences of `dataset` (for `kl_unigram`)."""
    counts: Counter = Counter()
    n = min(len(dataset), UNIGRAM_SEQUENCES)
    for i in range(n):
        counts.update(_sequence(dataset[i]).tolist())
    return [counts.get(token, 0) for token in range(vocab)], n
