"""The training loop with live telemetry, periodic eval, checkpoints and exact resume.

Step numbers count optimizer updates: everything logged at step s (telemetry, eval) is
measured on the weights after s updates, which is also what checkpoint `step_s` holds, so
live values and post-hoc values on a checkpoint describe the same model.

Two sources of values, one set of probes:

* `live`: every `telemetry.every` steps the probes read the activations of the training
  forward itself (the training batch), so telemetry costs no extra forward pass.
* `checkpoint`: whenever a checkpoint is saved, the probes also measure the run's fixed probe
  batch on those weights: exactly what `phaselens probe` computes post-hoc on the checkpoint.
  On runs that store an induction batch (`Study.induction_batch`: text, late disambiguation) the
  probes the checkpoint plan routes to it (`RunConfig.checkpoint_plan`: heads, and on text runs
  attention_to and patching) read that batch instead, as they do post-hoc.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from phaselens.errors import CheckpointError, RunError, StoreError, TrainingDiverged
from phaselens.models import build_model
from phaselens.models.checkpoints import load_trainer_state, load_weights, save_checkpoint
from phaselens.models.device import resolve_device
from phaselens.probes.base import Measurement
from phaselens.probes.live import Telemetry, ValueQueue
from phaselens.probes.loss import prediction_accuracy, token_losses
from phaselens.probes.measure import measure_batches
from phaselens.probes.plan import TRAINING_BATCH
from phaselens.progress import progress_bar
from phaselens.store.atomic import disk_full, disk_of
from phaselens.store.metrics import MetricsStore, MetricsWriter, integrity_problem, set_aside
from phaselens.store.tensorboard import TensorBoardLog
from phaselens.store.run_dir import RunDir
from phaselens.store.run_record import RunRecord, timestamp, versions
from phaselens.store.unigram import unigram_path
from phaselens.tasks.batch import TaskBatch
from phaselens.tasks.induction import PROBE_MIN_SEQ_LEN, induction_probe_batch
from phaselens.tasks.unigram import write_training_unigram
from phaselens.training.config import RunConfig, config_differences
from phaselens.training.memory import check_memory
from phaselens.tasks.induction import INDUCTION_SEED_OFFSET

PROBE_SEED_OFFSET = 1_000_003  # probe and eval batches use their own seeded streams
EVAL_SEED_OFFSET = 2_000_003
NAN_CHECK_EVERY = 50
ANSWER = "answer"  # a task whose batches have this prediction set gets train_acc and eval_acc


def learning_rate(config: RunConfig, step: int) -> float:
    """Learning rate at `step` (a pure function of the step, so resume needs no scheduler state)."""
    t = config.train
    if t.warmup and step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def task_loss(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's loss mask: logits (B, T, V) -> ()."""
    losses = token_losses(logits, batch.tokens)  # (B, T-1)
    mask = batch.loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum()


def answer_accuracy(metric: str, logits: torch.Tensor, batch: TaskBatch) -> list[Measurement]:
    """Accuracy at the batch's `answer` predictions as `metric`, for tasks that declare that set; else nothing."""
    if ANSWER not in batch.positions:
        return []
    return [Measurement(metric, prediction_accuracy(logits, batch.tokens, batch.predictions(ANSWER, metric)))]


def induction_batch_for(config: RunConfig, task: Any, probe: TaskBatch) -> TaskBatch | None:
    """The fixed induction batch of a text run: as many sequences as its probe batch, of its length, drawn
    from the ordinary ids of the model's tokenizer (no special tokens), seeded from the run's seed.
    None when the sequences are too short to hold a segment and its repeat (heads then read the probe batch)."""
    if probe.tokens.shape[1] < PROBE_MIN_SEQ_LEN:
        return None
    model: Any = config.model  # every kind's config has d_vocab and n_ctx (`models.config`), as its own field
    ordinary = task.model_tokenizer(model.d_vocab).ordinary_ids()
    generator = torch.Generator().manual_seed(config.train.seed + INDUCTION_SEED_OFFSET)
    return induction_probe_batch(ordinary, probe.tokens.shape[1], len(probe), generator)


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    status: str
    seconds: float
    stopped_by: str | None = None  # "SIGINT" (Ctrl-C) or "SIGTERM" when a signal stopped the run


class _StopFlag:
    """Turns the first Ctrl-C, or SIGTERM (what a scheduler or `kill` sends), into a request to checkpoint and
    stop at the end of the step (a checkpoint being written is finished first); a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.by: str | None = None  # the signal that asked: "SIGINT" or "SIGTERM"

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in self.SIGNALS}

        def restore() -> None:
            for number, handler in previous.items():
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)

        def handler(signum, frame):
            if self.requested:  # a second one stops at once
                restore()
                raise KeyboardInterrupt(signal.Signals(signum).name)
            self.requested, self.by = True, signal.Signals(signum).name

        for number in self.SIGNALS:
            signal.signal(number, handler)
        try:
            yield
        finally:
            restore()


class Trainer:
    """Trains one run into `out`; `resume=True` continues from its last good checkpoint."""

    def __init__(self, config: RunConfig, out: Path | str, resume: bool = False, progress: bool = True,
                 new_metrics: bool = False):
        config.validate()
        self.config = config
        self.run = RunDir(out)
        self.resume = resume
        self.new_metrics = new_metrics
        self.progress = progress
        self.device = resolve_device(config.train.device, "train.device")
        check_memory(config, self.device)

    # ------------------------------------------------------------------ set-up

    def _prepare_directory(self) -> None:
        """Refuse what is in the way; a run that never reached its first checkpoint is started over."""
        run = self.run
        if run.path.exists() and not run.path.is_dir():
            raise RunError(f"--out {run.path} is a file; give a directory for the run")
        if self.resume:
            if not run.exists():
                raise RunError(f"cannot resume: {run.path} has no run.json")
            changed = config_differences(run.record().config, self.config.to_dict())
            if changed:
                raise RunError(f"cannot resume {run.path}: its config differs in {', '.join(changed)}; resume with the same config")
            if run.checkpoint_steps():
                self._check_metrics_store()
                return
        elif run.exists() and run.checkpoint_steps():
            raise RunError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
        elif not run.exists() and run.path.is_dir() and not run.holds_only_a_lock():
            raise RunError(f"{run.path} is not empty and holds no phaselens run ({', '.join(sorted(e.name for e in run.path.iterdir())[:5])}); "
                           "choose a new or empty --out")
        if run.exists():  # set up but never checkpointed (interrupted or crashed early): nothing to resume, start over
            print(f"{run.path} has no checkpoint yet: starting it over")
            run.clear()  # refuses (naming them) when the user's files are among phaselens's
            self.resume = False
        run.path.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        config = cfg.to_dict()
        model: Any = cfg.model  # every kind's config has d_vocab and n_ctx (`models.config`), as its own field
        run.write(RunRecord(
            name=cfg.name, status="running", config=config, model=config["model"],
            task={"name": cfg.data.task, **config["data"], "seq_len": model.n_ctx, "vocab": model.d_vocab},
            versions=versions(), device=str(self.device), steps_done=0, created=timestamp(),
        ))
        MetricsStore(run.metrics_db).close()  # readers find a store from the start

    def _check_metrics_store(self) -> None:
        """A resume continues the rows in metrics.sqlite: refuse when they are gone or damaged, unless
        `new_metrics` (a damaged file is then kept beside the new one, never deleted)."""
        path = self.run.metrics_db
        problem = "is missing" if not path.is_file() else integrity_problem(path)
        if problem is None:
            return
        if not self.new_metrics:
            raise StoreError(f"cannot resume {self.run.path}: {path.name} {problem if problem == 'is missing' else f'is damaged ({problem})'}, "
                             "so the metric rows before the last checkpoint would be lost; pass --new-metrics to continue "
                             "with a new store (only rows from the resumed steps on)")
        if path.is_file():
            kept = set_aside(path)
            print(f"kept the damaged {path.name} as {kept.name}; continuing with a new one")

    def _build(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model).to(self.device)
        self.task = cfg.build_task()
        self.data_rng = torch.Generator().manual_seed(cfg.train.seed)
        if self.run.probe_batch.is_file():
            probe = TaskBatch.load(self.run.probe_batch)
        else:
            probe = self.task.sample(cfg.data.probe_size, torch.Generator().manual_seed(cfg.train.seed + PROBE_SEED_OFFSET), split="probe")
            probe.save(self.run.probe_batch)
        self.probe_batch = probe.to(self.device)
        # Batches by the name the checkpoint plan routes probes to; the induction batch, where the
        # study keeps one, is written once like the probe batch.
        self.probe_batches = {"probe": self.probe_batch}
        if cfg.study.induction_batch:
            induction: TaskBatch | None
            if self.run.induction_batch.is_file():
                induction = TaskBatch.load(self.run.induction_batch)
            else:
                induction = induction_batch_for(cfg, self.task, probe)
                if induction is not None:
                    induction.save(self.run.induction_batch)
            if induction is not None:
                self.probe_batches["induction"] = induction.to(self.device)
        # Full batch (train.batch_size=0): the whole training split, built once; it draws nothing from the data RNG.
        self.full_batch = self.task.sample(0, self.data_rng, split="train").to(self.device) if cfg.train.batch_size == 0 else None
        eval_rng = torch.Generator().manual_seed(cfg.train.seed + EVAL_SEED_OFFSET)
        self.eval_batch = self.task.sample(cfg.data.eval_size, eval_rng, split="eval").to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2),
        )

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state(), "data": self.data_rng.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _save(self, step: int) -> None:
        # Rows before a checkpoint must be on disk once it exists: a resume rewrites only those after it.
        self.telemetry.flush()
        self.telemetry.sink.flush()
        save_checkpoint(self.run.checkpoint(step), self.model, self.optimizer, self._rng_state(), {"step": step})
        self._measure_checkpoint(step)

    def _restore(self) -> int:
        """Load the newest checkpoint that reads cleanly; returns its step."""
        for stale in self.run.partial_checkpoints():  # half-written by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        steps = self.run.checkpoint_steps()
        errors = []
        for step in reversed(steps):
            path = self.run.checkpoint(step)
            try:
                load_weights(self.model, path)
                info, rng = load_trainer_state(path, self.optimizer)
            except CheckpointError as exc:
                errors.append(str(exc))
                continue
            torch.set_rng_state(rng["torch"])
            self.data_rng.set_state(rng["data"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            for line in errors:
                print(f"skipped a bad checkpoint: {line}")
            return int(info["step"])
        raise RunError(f"cannot resume {self.run.path}: no readable checkpoint" + (f" ({'; '.join(errors)})" if errors else ""))

    # ------------------------------------------------------------------ the loop

    def setup(self) -> int:
        """Create or reopen the run directory, build everything, and return the first step to train."""
        self._prepare_directory()
        return self._start()

    def _start(self) -> int:
        """Build everything in the prepared run directory and return the first step to train."""
        self._build()
        start = 0
        if self.resume:
            start = self._restore()
            store = MetricsStore(self.run.metrics_db)
            # Live rows from the checkpoint on are rewritten below; checkpoint rows at `start` describe
            # weights that do not change (post-hoc probes' among them), so only later ones go.
            store.delete_from_step(start, source="live")
            store.delete_from_step(start + 1, source="checkpoint")
            store.close()
            self.run.update(status="running", stop_reason=None)
        tel = self.config.telemetry
        if not unigram_path(self.run.path).is_file():  # the training data's token counts, for `kl_unigram`
            write_training_unigram(self.config, unigram_path(self.run.path))
        # What is measured, with which options and on which batch: the run's measurement plans (`probes.plan`).
        live = self.config.live_plan().require("telemetry.probes")
        probes = [planned.make() for planned in live.probes]
        # probes measured on a copy of the weights (circuits) read the fixed batch the plan routes them to
        copy_batches = {p.name: self.probe_batches.get(p.batch, self.probe_batch) for p in live.probes if p.batch != TRAINING_BATCH}
        for probe in probes:
            probe.bind_run(self.run.path)
        # The TensorBoard mirror writes on the metrics writer's thread, never on the training step's.
        writer = MetricsWriter(self.run.metrics_db, mirror=TensorBoardLog(tel.tensorboard) if tel.tensorboard else None)
        self.telemetry = Telemetry(self.model, probes, store=writer, every=tel.every, flush_every=tel.flush_every,
                                   background=None if tel.background else False, copy_batches=copy_batches)
        # Checkpoint measurements: the live probes plus those asked for at checkpoints only, on the fixed batches.
        checkpoint = self.config.checkpoint_plan("induction" in self.probe_batches).require("telemetry.checkpoint_probes")
        self.checkpoint_probes = [planned.make() for planned in checkpoint.probes]
        self.checkpoint_routes = checkpoint.routes
        for probe in self.checkpoint_probes:
            probe.bind_run(self.run.path)
        # Shares the writer; closing the live telemetry closes it.
        self.checkpoint_values = ValueQueue(writer, source="checkpoint")
        if self.resume:
            self._measure_checkpoint(start)
        else:
            self._save(0)
        return start

    def train(self) -> TrainResult:
        threads = torch.get_num_threads()
        if self.config.train.threads:
            torch.set_num_threads(self.config.train.threads)
        try:
            with self.run.writer_lock("train --resume" if self.resume else "train"):  # one writer per run directory
                return self._train()
        finally:
            torch.set_num_threads(threads)

    def _train(self) -> TrainResult:
        started = time.time()
        self._prepare_directory()  # refuses what is in the way before anything is written
        cfg = self.config
        stop = _StopFlag()
        step = start = 0
        status, reason = "failed", None
        try:
            with stop.installed():
                step = start = self._start()
                bar = progress_bar(f"train {cfg.name}", cfg.train.steps, completed=start, enabled=self.progress, field="loss")
                with bar as update:
                    recent: list[tuple[int, torch.Tensor]] = []
                    for step in range(start, cfg.train.steps):
                        recent.append((step, self.step(step)))
                        done = step + 1
                        if len(recent) >= NAN_CHECK_EVERY or done % cfg.train.checkpoint_every == 0 or stop.requested:
                            loss = self._check_finite(recent)
                            update(completed=done, value=None if loss is None else f"{loss:.3f}")
                            recent = []
                        else:  # the count every step (a slow step's log line is due by time), the loss when checked
                            update(completed=done)
                        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or stop.requested:
                            self._save(done)
                            self.run.update(steps_done=done)
                        if stop.requested:
                            step = done
                            status, reason = "stopped", f"{_stopped_by(stop.by)} at step {done} (checkpoint saved); continue with --resume"
                            break
                    else:
                        step = cfg.train.steps
                        self._measure_final(step)
                        status = "finished"
                    update(completed=step)
        except KeyboardInterrupt as exc:  # a second Ctrl-C or SIGTERM: stop at once; the last checkpoint is where a resume starts
            saved = self.run.checkpoint_steps()
            status, by = "stopped", _stopped_by(str(exc) or stop.by)
            reason = (f"{by} during step {step}; last checkpoint: step {saved[-1]}, continue with --resume" if saved
                      else f"{by} before the first checkpoint; run the same command again to start over")
            raise
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, TrainingDiverged) else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            if _out_of_memory(exc):
                raise RunError(f"out of memory at step {step} of {self.run.path} ({_first_line(exc)}); "
                               "lower train.batch_size or model.n_ctx") from exc
            if disk_full(exc):
                saved = self.run.checkpoint_steps()
                reason = f"the disk filled up at step {step}"
                raise RunError(f"the disk holding {self.run.path}, {disk_of(self.run.path)}, is full at step {step}: "
                               + (f"the last checkpoint is step {saved[-1]} (metrics up to it are saved); free space and "
                                  "continue with --resume" if saved else "nothing was saved; free space and run it again")) from None
            raise
        finally:
            if hasattr(self, "checkpoint_values"):
                self.checkpoint_values.flush()
            if hasattr(self, "telemetry"):
                self.telemetry.close()
            self.run.update(status=status, stop_reason=reason, finished=timestamp())
        return TrainResult(self.run.path, step, status, time.time() - started, stop.by)

    def step(self, step: int) -> torch.Tensor:
        """One optimizer update (with eval and telemetry when due); returns the detached training loss."""
        cfg, telemetry = self.config, self.telemetry
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        if step % cfg.train.eval_every == 0:
            self._evaluate(step)
        batch = self.full_batch
        if batch is None:
            batch = self.task.sample(cfg.train.batch_size, self.data_rng).to(self.device)
        # Live probes read a few rows of the training forward: averages over 8 sequences are
        # steady, and the cost of the reductions stays a small fraction of the step.
        rows = slice(0, cfg.telemetry.rows or None)
        with telemetry.step(step, batch.rows(rows), rows=rows):
            logits = self.model(batch.tokens)  # (B, T, V)
        loss = task_loss(logits, batch)
        if telemetry.is_due(step):
            telemetry.log(step, "loss", [Measurement("train", loss.detach()), *answer_accuracy("train_acc", logits.detach(), batch)])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def _evaluate(self, step: int) -> None:
        logits = self.model(self.eval_batch.tokens)  # (B, T, V)
        loss = task_loss(logits, self.eval_batch)
        self.telemetry.log(step, "loss", [Measurement("eval", loss), *answer_accuracy("eval_acc", logits, self.eval_batch)])

    @torch.no_grad()
    def _measure_final(self, step: int) -> None:
        """The last update has no training forward after it: evaluate the final weights once more."""
        self._evaluate(step)

    def _measure_checkpoint(self, step: int) -> None:
        """Probe values on the run's fixed batches for the weights saved at `step` (source 'checkpoint')."""
        if not self.checkpoint_probes:
            return
        wanted = {p.name for p in self.checkpoint_probes if p.checkpoint_artifacts}
        artifacts: dict[str, Any] = {}
        for name, measurements in measure_batches(self.model, self.probe_batches, self.checkpoint_probes,
                                                  self.checkpoint_routes, artifacts=artifacts if wanted else None):
            self.checkpoint_values.log(step, name, measurements)
        self.checkpoint_values.flush()
        for name in wanted & set(artifacts):
            self.run.write_artifact(name, step, artifacts[name])

    def _check_finite(self, recent: list[tuple[int, torch.Tensor]]) -> float | None:
        """One device sync per NAN_CHECK_EVERY steps: raise on NaN/inf, else the mean loss."""
        if not recent:
            return None
        losses = torch.stack([loss for _, loss in recent]).float().cpu()
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            step, value = recent[first][0], float(losses[first])
            good = [s for s in self.run.checkpoint_steps() if s <= step]
            raise TrainingDiverged(
                f"training loss became {value} at step {step} ({self.run.path}); lower train.lr "
                f"(now {self.config.train.lr}) or set train.grad_clip; last good checkpoint: step {good[-1] if good else 'none'}"
            )
        return float(losses.mean())


def _stopped_by(signal_name: str | None) -> str:
    """How run.json's stop_reason names an interruption: "interrupted" (Ctrl-C) or "stopped by SIGTERM"."""
    return "stopped by SIGTERM" if signal_name == "SIGTERM" else "interrupted"


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("not enough memory" in str(exc) or "out of memory" in str(exc)))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def train(config: RunConfig, out: Path | str, resume: bool = False, progress: bool = True,
          new_metrics: bool = False) -> TrainResult:
    """Train `config` into run directory `out` (see `Trainer`); `new_metrics` lets a resume start a new
    metrics.sqlite when the old one is missing or damaged."""
    return Trainer(config, out, resume=resume, progress=progress, new_metrics=new_metrics).train()
