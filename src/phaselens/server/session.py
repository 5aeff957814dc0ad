"""The runs a server was given and the models it has loaded.

Runs are addressed by name only: the server never opens a path that came from a request. A
model handed over in-process (`pl.serve(model=...)`) is kept by reference, so weight edits and
hooks made in the notebook are what the next request computes with. Every model is read through
its adapter (`phaselens.models.adapter`): a phaselens transformer, or any `TransformerBridge`,
whether given in-process or booted from a revision of an imported series.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

from phaselens.errors import PhaselensError, RunError
from phaselens.models.adapter import ModelAdapter, adapter_for
from phaselens.run import Run, open_run

KERNEL = "kernel"  # the entry of a model given without a run
MODEL_CACHE_SIZE = 4
MAX_NEURON_FILE_BYTES = 20_000_000
ABSOLUTE_PATH = re.compile(r"(^|[\s'\"(=])(/[^\s'\"():,;]+)")  # a path outside the served runs: shown by its last part


RUN_FILES = ("run.json", "metrics.sqlite", "metrics.sqlite-wal", "checkpoints")  # what a run writes as it goes


def run_signature(path: Path) -> tuple:
    """Changes whenever the run at `path` writes: its record, its metrics (the WAL included) or a checkpoint."""
    parts = []
    for name in RUN_FILES:
        try:
            stat = (path / name).stat()
        except OSError:
            stat = None
        if stat is None or (name.endswith("-wal") and stat.st_size == 0):  # SQLite makes an empty WAL on a first read
            parts.append((name, None, None))
        else:
            parts.append((name, stat.st_mtime_ns, stat.st_size))
    return tuple(parts)


class NotFound(PhaselensError):
    """A run, checkpoint or file the server does not serve."""


class BadInput(PhaselensError):
    """A request the server refuses: text too long, an unknown token, a layer out of range."""


class Busy(PhaselensError):
    """The model is busy with another request for longer than a request may wait (HTTP 503)."""


class ModelLock:
    """One computation on a model at a time (hooks are per call), waited for at most `wait` seconds: a
    request behind one that hangs is refused with `Busy` instead of queueing forever, so every run stays served."""

    def __init__(self, wait: float = 60.0):
        self._lock = threading.RLock()
        self.wait = wait

    def __enter__(self) -> "ModelLock":
        if not self._lock.acquire(timeout=self.wait):
            raise Busy(f"the server has been busy with another computation for over {self.wait:g} s; try again in a moment")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


class Session:
    """Runs by name, a small cache of loaded checkpoints, and the in-process model if any."""

    def __init__(self, runs: Sequence[Path | str] = (), model: Any = None, model_run: str | None = None,
                 device: str | None = None):
        self.runs: dict[str, Path] = {}
        self.device = device  # where checkpoints are loaded (None: the CPU); `pl.serve` resolves it by the device rule
        for path in runs:
            path = Path(path).resolve()
            if not path.is_dir():  # a typo is refused; a damaged run is served and listed with its problem
                raise RunError(f"{path} is not a run directory")
            name = path.name
            suffix = 1
            while name in self.runs or name == KERNEL:
                suffix += 1
                name = f"{path.name}-{suffix}"
            self.runs[name] = path
        self.model = adapter_for(model) if model is not None else None  # refuses a model it cannot read, before serving
        if model is not None and model_run is None:
            model_run = next(iter(self.runs), KERNEL)
        self.model_run = model_run if model is not None else None
        self.lock = ModelLock()  # one computation on a model at a time, waited for a bounded time
        self._models: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._means: dict[tuple, Any] = {}
        self._head_weights: dict[int, Any] = {}  # id(checkpoint adapter) -> its HeadWeights, evicted with the model
        self._derived: dict[tuple[str, str], tuple[tuple, Any]] = {}  # (run, what) -> (run_signature, value)
        self._derived_locks: dict[str, threading.RLock] = {}
        self.model_version = 0

    # -------------------------------------------------------------------- runs

    def names(self) -> list[str]:
        names = list(self.runs)
        if self.model_run == KERNEL:
            names.append(KERNEL)
        return names

    def run(self, name: str) -> Run:
        """A fresh `Run` for each request: its SQLite connection then lives in the request's thread."""
        if name not in self.runs:
            raise NotFound(f"no run named {name!r} is served here; served: {', '.join(self.names()) or 'none'}")
        return open_run(self.runs[name])

    def has_run(self, name: str) -> bool:
        return name in self.runs

    def derived(self, run: str, what: str, compute: Callable[[], Any]) -> Any:
        """`compute()`'s value for `run`, kept until the run writes again (`run_signature`).

        The views that read a whole run (its series list, transitions and stages) then cost a page load
        nothing once computed; requests for one run wait for each other, so a value is computed once.
        """
        if run not in self.runs:
            raise NotFound(f"no run named {run!r} is served here; served: {', '.join(self.names()) or 'none'}")
        with self._derived_locks.setdefault(run, threading.RLock()):
            signature = run_signature(self.runs[run])  # read first: a write during `compute` recomputes next time
            kept = self._derived.get((run, what))
            if kept is not None and kept[0] == signature:
                return kept[1]
            value = compute()
            self._derived[(run, what)] = (signature, value)
            return value

    def redact(self, message: str) -> str:
        """`message` with the server's absolute paths replaced by run-relative names (errors go to the browser)."""
        for name, path in sorted(self.runs.items(), key=lambda item: -len(str(item[1]))):
            message = message.replace(str(path), name)
        return ABSOLUTE_PATH.sub(lambda m: m.group(1) + m.group(2).rsplit("/", 1)[-1], message)

    # -------------------------------------------------------------------- models

    def model_for(self, run: str, step: int | None) -> tuple[ModelAdapter, str]:
        """The adapter of `run`'s model at `step` and where it came from ('kernel' or 'checkpoint')."""
        if step is None and self.model is not None and run == self.model_run:
            return self.model, "kernel"
        if run == KERNEL and self.model_run == KERNEL:
            raise NotFound("the in-process model has no checkpoints; leave step empty")
        handle = self.run(run)
        steps = handle.checkpoint_steps()
        if not steps:
            raise NotFound(f"run {run!r} has no checkpoints yet")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise NotFound(f"run {run!r} has no checkpoint at step {step}")
        key = (run, step)
        if key not in self._models:
            self._models[key] = adapter_for(handle.load_model(step, device=self.device))
            while len(self._models) > MODEL_CACHE_SIZE:
                _, evicted = self._models.popitem(last=False)
                self._head_weights.pop(id(evicted), None)
        self._models.move_to_end(key)
        return self._models[key], "checkpoint"

    def mean_values(self, run: str, step: int | None, source: str, model: ModelAdapter, nodes: list, tokens: Any) -> dict:
        """Mean activation of each node over the run's probe batch (over `tokens` when the run has none), cached."""
        from phaselens.probes.ablation import mean_values

        key = (source, run, id(model), self.model_version if source == "kernel" else None)
        cached = self._means.setdefault(key, {})
        missing = [node for node in nodes if node not in cached]
        if missing:
            reference = None
            if run in self.runs:
                try:
                    reference = self.run(run).probe_batch().tokens.to(tokens.device)  # (B, T)
                except OSError:
                    pass  # an imported series has no probe batch
            if reference is None:
                reference = tokens[None]
                cached = {}  # means of this text alone: not worth keeping
            cached.update(mean_values(model, reference, missing))
        return {node: cached[node] for node in nodes}

    def head_weights(self, model: ModelAdapter, source: str) -> Any:
        """The model's per-head weights (None without heads): a checkpoint's once, the notebook's model's as it is now."""
        if source == "kernel":
            return model.head_weights()
        if id(model) not in self._head_weights:
            self._head_weights[id(model)] = model.head_weights()
        return self._head_weights[id(model)]

    def model_changed(self) -> None:
        """The in-process model was edited: forget cached values derived from it."""
        self.model_version += 1
        self._means = {k: v for k, v in self._means.items() if k[0] != "kernel"}  # keyed (source, run, model, version)

    # -------------------------------------------------------------------- neurons

    def neuron_files(self, run: str) -> list[Path]:
        """JSON files under RUN/artifacts/neurons/ (never following a link out of the run)."""
        folder = self.runs[run] / "artifacts" / "neurons" if run in self.runs else None
        if folder is None or not folder.is_dir():
            return []
        root = self.runs[run].resolve()
        files = []
        for path in sorted(folder.rglob("*.json")):
            resolved = path.resolve()
            if resolved.is_relative_to(root) and resolved.is_file() and resolved.stat().st_size <= MAX_NEURON_FILE_BYTES:
                files.append(resolved)
        return files


def tokenize(text: str, model: ModelAdapter) -> list[int]:
    """Token ids from what the user typed: ids separated by spaces or commas, else text through the model's tokenizer."""
    text = text.strip()
    vocab = model.d_vocab
    if not text:
        raise BadInput("the text is empty: type text, or token ids separated by spaces (e.g. 5 17 42 5 17)")
    parts = [p for p in re.split(r"[\s,]+", text) if p]
    if all(re.fullmatch(r"\d+", p) for p in parts):
        ids = [int(p) for p in parts]
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise BadInput(f"token ids must be below the vocabulary size {vocab}; got {bad[:5]}")
    else:
        try:
            ids = model.tokenizer.encode(text)
        except ValueError as exc:  # a model of plain ids takes no text: the tokenizer says what it takes
            raise BadInput(str(exc)) from None
    if len(ids) < 2:
        raise BadInput(f"the text is {len(ids)} token long: it needs at least 2 (a loss needs a next token)")
    if len(ids) > model.n_ctx:
        raise BadInput(f"the text has {len(ids)} tokens; the model's context holds {model.n_ctx}")
    return ids


VISIBLE_WHITESPACE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "↵"})


def token_labels(ids: list[int], model: ModelAdapter) -> list[str]:
    """How tokens are shown: decoded by the model's tokenizer (ids, bytes, or its Hugging Face tokens).

    Line breaks, and a token that is only whitespace, are drawn with visible marks; a token that
    decodes to nothing (padding past the tokenizer's end) shows its id.
    """
    def visible(i: int, label: str) -> str:
        if not label:
            return f"#{i}"
        return label.translate(VISIBLE_WHITESPACE) if not label.strip() else label.replace("\n", "↵").replace("\t", "⇥")

    return [visible(int(i), label) for i, label in zip(ids, model.tokenizer.labels(ids))]


def text_hint(model: ModelAdapter) -> str:
    """What the text box takes, in the user's words."""
    kind = model.tokenizer.kind
    if kind == "ids":
        return f"token ids (0–{model.d_vocab - 1}) separated by spaces"
    what = "bytes (UTF-8)" if kind == "bytes" else "the model's own tokenizer"
    return f"text, tokenised with {what}; or token ids separated by spaces"


def as_text(ids: list[int], model: ModelAdapter) -> str:
    """`ids` as the user would type them: decoded text when it tokenises back to exactly these ids, else the ids."""
    tokenizer = model.tokenizer
    if tokenizer.kind != "ids":
        text = tokenizer.decode(list(ids))  # bytes as their UTF-8 characters, line breaks included
        if not re.fullmatch(r"[\d\s,]*", text):
            try:
                if tokenizer.encode(text) == list(ids):
                    return text
            except ValueError:
                pass
    return " ".join(map(str, ids))


def induction_sample(model: ModelAdapter, seq_len: int = 48) -> list[int]:
    """One sequence of the induction probe batch's construction (`induction_probe_batch`) in the model's
    ordinary tokens: random tokens with a segment repeated at a variable offset."""
    import torch

    from phaselens.tasks.induction import induction_probe_batch

    batch = induction_probe_batch(model.tokenizer.ordinary_ids(), min(seq_len, model.n_ctx), 1, torch.Generator().manual_seed(0))
    return batch.tokens[0].tolist()


def corrupt_first_half(ids: list[int]) -> list[int]:
    """`ids` with each token of the first half replaced by the next larger token of the sequence (cyclically).

    The patching counterpart of a sample: the same length, and only tokens the sample itself uses,
    so it stays within the model's ordinary tokens whatever its vocabulary.
    """
    used = sorted(set(ids))
    following = {token: used[(i + 1) % len(used)] for i, token in enumerate(used)}
    return [following[t] if i < len(ids) / 2 else t for i, t in enumerate(ids)]


def neuron_view(files: list[Path], root: Path) -> dict:
    """The newest readable neuron artifact among `files` as the view's fields (see `schemas.NeuronsResponse`);
    files that are not `phaselens.neurons/1` artifacts are listed under `problems`, by run-relative name."""
    from phaselens.store.neuron_artifact import ArtifactError, NeuronLayer, read_neuron_artifact

    problems, artifact = [], None
    for path in reversed(files):  # step_<S>.json sorts by step: the newest first
        try:
            artifact = read_neuron_artifact(path, name=str(path.relative_to(root)))
            break
        except ArtifactError as exc:
            problems.append(str(exc))
    if artifact is None:
        return {"available": False, "problems": problems}
    layers = [{"name": layer.hook, "layer": layer.layer, "values": {k: getattr(layer, k) for k in NeuronLayer.STATISTICS}}
              for layer in artifact.layers]
    neurons = [{"layer": layer.hook, "neuron": item.neuron, "firing_rate": item.firing_rate, "selectivity": item.selectivity,
                "contexts": [{"before": c.before, "token": c.token, "after": c.after, "value": c.value} for c in item.contexts]}
               for layer in artifact.layers for item in layer.most_selective]
    return {"available": True, "step": artifact.step, "layers": layers, "neurons": neurons, "problems": problems}
