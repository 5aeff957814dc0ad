"""`phaselens neurons`: stream held-out tokens through a model and keep per-neuron statistics.

The tokens go through in fixed-size chunks of full context windows. Only the chosen hook is
touched: a hook function folds each layer's activation into that layer's `NeuronStats` and
lets the tensor go, so memory depends on the chunk and the number of neurons, never on how
many tokens are scanned. On a CPU with a core to spare, the folding runs on a background thread
while the model computes the next layer and chunk (at most one chunk per layer waits for it), so
the statistics cost little more than the forward pass itself. Positions are offsets into the scanned token stream, which is kept
(it is the input, not an activation) so that any neuron's strongest contexts can be shown.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from phaselens.background import OrderedThread, spare_core
from phaselens.errors import ConfigError
from phaselens.models.adapter import ModelAdapter, adapter_for
from phaselens.probes.neurons import NeuronStats, default_neuron_hook
from phaselens.progress import progress_bar
from phaselens.store.neuron_artifact import MIN_FIRING_TOKENS, NeuronArtifact, NeuronContext, NeuronLayer, SelectiveNeuron, write_neuron_artifact

CHUNK_ELEMENTS = 2**22  # activation values per layer and chunk (16 MB in float32)
DEFAULT_TOKENS = 200_000


@dataclass
class TokenStream:
    """Held-out tokens as one stream, and how to show them (bytes as text, other vocabularies as ids)."""

    tokens: torch.Tensor  # (n,) long
    kind: str = "bytes"  # "bytes" or "ids"
    description: str = ""

    def show(self, start: int, stop: int) -> str:
        piece = self.tokens[max(start, 0):max(stop, 0)].tolist()
        if self.kind == "bytes":
            return bytes(piece).decode("utf-8", errors="replace")
        return " ".join(map(str, piece)) + (" " if piece else "")


def text_stream(path: str | None = None, corpus: str | None = None, eval_fraction: float = 0.1) -> TokenStream:
    """The held-out part (last `eval_fraction`) of a text file or built-in corpus, as bytes."""
    from phaselens.tasks.text import TextTask

    task = TextTask.open(path=path, corpus=corpus, seq_len=2, eval_fraction=eval_fraction)
    held_out = task.split_bytes("eval").long()
    return TokenStream(held_out, "bytes", f"held-out {eval_fraction:.0%} of {task.path} ({len(held_out):,} bytes)")


def task_stream(task: Any, n_tokens: int, seed: int = 0) -> TokenStream:
    """Held-out sequences of any task, laid end to end (for tasks that are not text)."""
    from phaselens.tasks.text import TextTask

    if isinstance(task, TextTask):
        held_out = task.split_bytes("eval").long()
        return TokenStream(held_out, "bytes", f"held-out {task.eval_fraction:.0%} of {task.path} ({len(held_out):,} bytes)")
    n_seq = math.ceil(n_tokens / task.seq_len)
    batch = task.sample(n_seq, torch.Generator().manual_seed(seed), split="eval")
    kind = "bytes" if getattr(task, "vocab", 0) == 256 else "ids"
    return TokenStream(batch.tokens.reshape(-1), kind, f"{n_seq} held-out sequences of the {task.name} task")


def resolve_hooks(model: torch.nn.Module | ModelAdapter, hook: str | None) -> list[tuple[int, str]]:
    """(layer, hook name) pairs for `hook`: a template with {}, a per-layer suffix, or one hook's full name."""
    adapter = adapter_for(model)
    names = adapter.hook_points
    if not hook:
        template = default_neuron_hook(adapter)
    elif "{}" in hook:
        template = hook
    elif hook in names:
        layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else 0
        return [(layer, hook)]
    else:
        suffix = hook if hook.startswith(("hook_", "mlp.", "attn.")) else f"hook_{hook}"
        template = f"blocks.{{}}.{suffix}"
    layers = [(layer, template.format(layer)) for layer in range(adapter.n_layers)]
    found = [(layer, name) for layer, name in layers if name in names]
    if not found:
        per_layer = sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")})
        raise ConfigError(f"--hook {hook!r}: the model has no hook {template.format(0)!r}; per-layer hooks: {', '.join(per_layer)}")
    return found


@dataclass
class NeuronScan:
    """Statistics of every hooked layer over one token stream."""

    hooks: list[tuple[int, str]]
    stats: list[NeuronStats]
    stream: TokenStream  # only the scanned part
    threshold: float
    top_k: int
    step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.stats[0].tokens if self.stats else 0


def chunk_rows(n_ctx: int, n_neurons: int) -> int:
    """Sequences per chunk: as many as fit CHUNK_ELEMENTS activation values of one layer."""
    return max(1, min(256, CHUNK_ELEMENTS // max(1, n_ctx * n_neurons)))


def windows(stream: TokenStream, n_tokens: int, n_ctx: int) -> torch.Tensor:
    """Consecutive full context windows covering the first ~n_tokens of the stream: (n_windows, n_ctx)."""
    n_windows = min(math.ceil(n_tokens / n_ctx), len(stream.tokens) // n_ctx)
    if n_windows < 1:
        raise ConfigError(f"the token stream ({stream.description}) is shorter than one context of {n_ctx} tokens")
    return stream.tokens[: n_windows * n_ctx].view(n_windows, n_ctx)


@torch.no_grad()
def scan_neurons(
    model: torch.nn.Module,
    stream: TokenStream,
    hook: str | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    threshold: float = 0.0,
    top_k: int = 10,
    progress: bool = True,
    rows: int | None = None,
) -> NeuronScan:
    """Per-neuron statistics of `hook` (default: BDH xy_sparse or a transformer's mlp.hook_post) over the stream."""
    adapter = adapter_for(model)
    hooks = resolve_hooks(adapter, hook)
    n_ctx, device = adapter.n_ctx, adapter.device
    seqs = windows(stream, n_tokens, n_ctx)  # (n_windows, n_ctx)
    stats: dict[str, NeuronStats] = {}
    offset = [0]
    folder = OrderedThread("phaselens-neurons", "folding neuron statistics", depth=len(hooks)) if spare_core(device) else None

    def accumulate(name: str, act: torch.Tensor, hook: Any) -> None:  # name: as asked (a bridge's hook may be an alias)
        n = act.shape[-1] * (act.shape[1] if act.dim() == 4 else 1)
        if name not in stats:
            stats[name] = NeuronStats(n, top_k=top_k, threshold=threshold, device=act.device)
        tokens = act.numel() // n
        fold = stats[name].update
        positions = torch.arange(offset[0], offset[0] + tokens, device=act.device)
        if folder is None:
            fold(act, positions)
        else:  # the forward only reads this activation after the hook, so the thread may read it too
            folder.submit(lambda: _in_inference_mode(fold, act, positions))

    fwd_hooks = [(name, functools.partial(accumulate, name)) for _, name in hooks]
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with torch.inference_mode():
            # The first window goes alone: its neuron count sizes the chunks after it (no extra forward).
            per_chunk = rows or 1
            with progress_bar("neurons", len(seqs) * n_ctx, unit="tokens", enabled=progress) as update:
                start = 0
                while start < len(seqs):
                    chunk = seqs[start:start + per_chunk].to(device)
                    offset[0] = start * n_ctx
                    adapter.run_with_hooks(chunk, fwd_hooks)
                    update(advance=chunk.numel())
                    start += len(chunk)
                    per_chunk = rows or chunk_rows(n_ctx, stats[hooks[0][1]].count.numel())
            if folder is not None:
                folder.wait()
    finally:
        if folder is not None:
            folder.close()
        adapter.model.train(was_training)
    scanned = TokenStream(seqs.reshape(-1).clone(), stream.kind, stream.description)
    return NeuronScan(hooks, [stats[name] for _, name in hooks], scanned, threshold, top_k)


def _in_inference_mode(fold: Callable[..., None], *args: Any) -> None:
    """Run `fold` under inference mode, which is per thread (the statistics are inference tensors)."""
    with torch.inference_mode():
        fold(*args)


def bare_forward(model: torch.nn.Module | ModelAdapter, stream: TokenStream, n_tokens: int, rows: int) -> None:
    """The same chunks through the model with no hooks: what `scan_neurons` is measured against."""
    adapter = adapter_for(model)
    seqs = windows(stream, n_tokens, adapter.n_ctx)
    adapter.model.eval()
    with torch.inference_mode():
        for start in range(0, len(seqs), rows):
            adapter.logits(seqs[start:start + rows].to(adapter.device))


# ---------------------------------------------------------------------------- the artifact


def _floats(values: torch.Tensor, digits: int = 6) -> list:
    return [None if (isinstance(v, float) and math.isnan(v)) else round(v, digits) for v in values.double().cpu().tolist()]


def context(stream: TokenStream, position: int, window: int, value: float) -> NeuronContext:
    """The text around `position`: `window` tokens before it, the token, and window // 4 after."""
    return NeuronContext(value=float(f"{value:.6g}"), position=position, before=stream.show(position - window, position),
                         token=stream.show(position, position + 1),
                         after=stream.show(position + 1, position + 1 + window // 4))


def most_selective(stats: NeuronStats, count: int, min_firings: int = MIN_FIRING_TOKENS) -> list[int]:
    """The `count` neurons with the highest selectivity among those that fired on at least `min_firings` tokens."""
    selectivity = stats.selectivity().nan_to_num(nan=-1.0)
    selectivity[stats.count < min_firings] = -1.0
    order = selectivity.argsort(descending=True)[:count]
    return [int(i) for i in order if selectivity[i] > 0]


def scan_to_artifact(scan: NeuronScan, window: int = 40, show: int = 8) -> NeuronArtifact:
    """Everything the report and the dashboard read (the `phaselens.neurons/1` artifact)."""
    layers = []
    for (layer, name), stats in zip(scan.hooks, scan.stats):
        summary = {k: float(v) for k, v in stats.summary().items()}
        summary["rate_quantiles"] = {str(q): v for q, v in stats.rate_quantiles().items()}
        top = []
        for neuron in most_selective(stats, show, max(MIN_FIRING_TOKENS, scan.top_k)):
            entries = [context(scan.stream, position, window, value)
                       for value, position in zip(stats.top_values[:, neuron].tolist(), stats.top_positions[:, neuron].tolist())
                       if position >= 0 and value > scan.threshold]
            top.append(SelectiveNeuron(neuron, float(stats.firing_rate()[neuron]), float(stats.selectivity()[neuron]), entries))
        layers.append(NeuronLayer(
            layer=layer, hook=name, n_neurons=int(stats.count.numel()), summary=summary,
            firing_rate=_floats(stats.firing_rate()), mean=_floats(stats.mean()), max=_floats(stats.max),
            selectivity=_floats(stats.selectivity(), 3),
            top_values=[_floats(row, 5) for row in stats.top_values.clamp(min=-1e30)],
            top_positions=stats.top_positions.cpu().tolist(), most_selective=top,
        ))
    return NeuronArtifact(step=scan.step, tokens=scan.tokens, threshold=scan.threshold, top_k=scan.top_k, window=window,
                          source=scan.stream.description, stream_kind=scan.stream.kind,
                          stream_tokens=scan.stream.tokens.tolist(), layers=layers, origin=dict(scan.meta))


def open_target(target: Path | str, step: int | None = None, text: str | None = None) -> tuple[torch.nn.Module, Callable[[int], TokenStream], dict]:
    """The model behind RUN (a run directory) or CHECKPOINT (a BDH .pt file), and its held-out tokens.

    A run streams the held-out split of its own task; a checkpoint file streams the held-out 10%
    of `text` (a file), or of the built-in Shakespeare corpus when no text is given.
    Returns (model, stream_for(n_tokens), info).
    """
    target = Path(target)
    if target.is_dir():
        from phaselens.run import open_run

        run = open_run(target)
        steps = run.checkpoint_steps()
        model = run.load_model(step)
        step = steps[-1] if step is None else step
        config = run.run_config()
        task = config.build_task()
        info = {"step": step, "run": str(run.path), "model": config.model.kind}
        if text:
            return model, lambda n: text_stream(path=text), info
        return model, lambda n: task_stream(task, n, seed=config.train.seed), info
    from phaselens.models.bdh_checkpoint import load_bdh_checkpoint

    model = load_bdh_checkpoint(target)
    info = {"step": step, "checkpoint": str(target), "model": "bdh"}
    stream = (lambda n: text_stream(path=text)) if text else (lambda n: text_stream(corpus="shakespeare"))
    return model, stream, info


@dataclass
class NeuronsResult:
    report: Path
    figure: Path | None
    artifact: Path
    lines: list[str]
    data: NeuronArtifact


def neurons_report(
    target: Path | str,
    hook: str | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    threshold: float = 0.0,
    top_k: int = 10,
    window: int = 40,
    text: str | None = None,
    step: int | None = None,
    out: Path | str | None = None,
    progress: bool = True,
) -> NeuronsResult:
    """Scan RUN (its last checkpoint, or `step`) or a BDH CHECKPOINT file and write the sparse-neuron report.

    A run gets RUN/report/neurons/neurons.md (+ neurons.png) and RUN/artifacts/neurons/step_<S>.json;
    a checkpoint file gets neurons.md, neurons.png and neurons.json in `out` (default: <file>_neurons/ beside it).
    """
    from phaselens.analysis.neuron_report import summary_lines, write_neuron_report

    for name, value in (("--tokens", n_tokens), ("--top-k", top_k), ("--window", window)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    target = Path(target)
    model, stream_for, info = open_target(target, step, text)
    scan = scan_neurons(model, stream_for(n_tokens), hook, n_tokens, threshold, top_k, progress=progress)
    scan.step = info.get("step")
    scan.meta = {"model": info["model"], **({"run": info["run"]} if "run" in info else {"checkpoint": info.get("checkpoint")})}
    data = scan_to_artifact(scan, window=window)
    if "run" in info:
        from phaselens.store.run_dir import RunDir

        run = RunDir(target)
        artifact = run.artifacts / "neurons" / f"step_{scan.step:08d}.json"
        out = Path(out) if out else run.report / "neurons"
    else:
        out = Path(out) if out else target.parent / f"{target.stem}_neurons"
        artifact = out / "neurons.json"
    replaced = _replaced_scan(artifact, data)
    write_neuron_artifact(artifact, data)
    report, figure = write_neuron_report(data, out)
    return NeuronsResult(report, figure, artifact, summary_lines(data) + replaced, data)


def _replaced_scan(path: Path, data: NeuronArtifact) -> list[str]:
    """A line saying what earlier scan `data` replaces at `path` (one scan per step is kept), where its settings differ."""
    from phaselens.store.neuron_artifact import ArtifactError, read_neuron_artifact

    if not path.is_file():
        return []
    try:
        before = read_neuron_artifact(path)
    except ArtifactError:
        return [f"replaced an unreadable neuron scan at {path}"]
    def settings(a: NeuronArtifact) -> str:
        return f"{', '.join(sorted({layer.hook for layer in a.layers}))}; {a.tokens:,} tokens, threshold {a.threshold:g}"
    if settings(before) == settings(data):
        return []
    return [f"replaced the earlier scan of this step ({settings(before)}) with this one ({settings(data)}): one scan per "
            f"step is kept ({path}), and the report and the dashboard show this one"]
