"""The run files a measurement plan needs, written once, before anything is measured.

A probe names them in `Needs.run_files` (the plan adds "induction_batch" for a probe routed to that
batch); `ensure_run_files(run, plan)` writes each one the run lacks. Every writer is deterministic in
the run's config and seed, so writing a file again gives the same file:

| name              | file                                   | who reads it                         |
|-------------------|----------------------------------------|--------------------------------------|
| `unigram`         | unigram.json (training-data token counts) | geometry's `kl_unigram`           |
| `induction_batch` | induction_batch.safetensors            | heads, attention_to, patching (where the study routes them) |
| `training_sample` | samples/train_n{n}_seed{seed}.safetensors | llc: the fixed sample n of L_n(w) |

Runs trained since these files existed have them from training; older runs get them here.
"""

from __future__ import annotations

from typing import Any, Callable

TRAINING_SAMPLE_SEED_OFFSET = 7_000_003  # the llc sample's generator: apart from the training, eval and probe streams


def write_unigram(run: Any, options: dict[str, Any]) -> None:
    """The training data's token counts, for a run trained before runs kept them."""
    from phaselens.store.unigram import unigram_path

    if not unigram_path(run.path).is_file():
        from phaselens.tasks.unigram import write_training_unigram

        write_training_unigram(run.run_config(), unigram_path(run.path))


def write_induction_batch(run: Any, options: dict[str, Any]) -> None:
    """The induction batch of a run trained before runs of its task kept one (text, late disambiguation).

    A run whose data phaselens does not keep (a Trainer run's dataset) cannot get one here: whoever wrote
    the run wrote it, and its probes read the probe batch meanwhile (`Run.plan`).
    """
    if run.dir.induction_batch.is_file():
        return
    from phaselens.errors import ConfigError
    from phaselens.training.trainer import induction_batch_for

    config = run.run_config()
    try:
        task = config.build_task()
    except ConfigError:
        return
    induction = induction_batch_for(config, task, run.probe_batch())
    if induction is not None:
        induction.save(run.dir.induction_batch)


def write_training_sample(run: Any, options: dict[str, Any]) -> None:
    """The run's fixed, seeded sample of training sequences the `llc` probe samples from (once per n, seed)."""
    from phaselens.probes.llc import SGLDOptions

    settings = SGLDOptions.from_options(options)
    path = run.dir.training_sample(settings.n, settings.seed)
    if not path.is_file():
        import torch

        task = run.run_config().build_task()
        generator = torch.Generator().manual_seed(TRAINING_SAMPLE_SEED_OFFSET + settings.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        task.sample(settings.n, generator, split="train").save(path)


RUN_FILES: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "unigram": write_unigram,
    "induction_batch": write_induction_batch,
    "training_sample": write_training_sample,
}


def ensure_run_files(run: Any, plan: Any) -> None:
    """Write every file `plan` (a `MeasurementPlan`) needs that `run` (a `Run`) lacks, each once."""
    for planned in plan.probes:
        for name in planned.run_files:
            RUN_FILES[name](run, planned.options)
