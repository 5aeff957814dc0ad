"""Revisions of an imported series read into one booted model: files, content hashes, read-ahead.

An imported series boots its architecture once (a Hugging Face model wrapped by
`TransformerBridge`, built without loading weights) and then, for each revision, reads only that
revision's safetensors (memory-mapped) and copies them into the same parameters. A background
thread reads and hashes revision k+1 while revision k is measured, so at most two revisions'
weights are in memory: the model's own and the one read ahead. A revision whose architecture
differs from the booted one (its config.json, or its tensor names and shapes) is booted fresh,
with a note saying why; so is one without safetensors.

A revision's content hash is the SHA-256 of its tensors in name order (name, dtype, shape, then
the raw bytes), so two revisions saved with the same weights hash the same whatever the file's
header order or metadata.
"""

from __future__ import annotations

import gc
import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from phaselens.errors import CheckpointError, ConfigError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# config.json keys that record how and when a revision was saved, not what the model is
BOOKKEEPING_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | None) -> torch.dtype:
    """The torch dtype the model's weights are held in (None: float32)."""
    name = dtype or "float32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------- files and hashes


@dataclass
class RevisionFiles:
    """Where one revision's config and weights are (weights: None when it has no safetensors)."""

    revision: str
    config: Path
    weights: list[Path] | None


def revision_files(source: str, revision: str, local: bool) -> RevisionFiles:
    """The config.json and safetensors files of `revision` (local: the folder source/revision; else the hub cache)."""
    if local:
        folder = Path(source) / revision
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} holds no saved Hugging Face model (config.json is missing)")
        config = folder / "config.json"
        index = folder / INDEX_FILE
        if (folder / WEIGHTS_FILE).is_file():
            return RevisionFiles(revision, config, [folder / WEIGHTS_FILE])
        if index.is_file():
            return RevisionFiles(revision, config, [folder / name for name in _shards(index)])
        return RevisionFiles(revision, config, None)
    return _hub_files(source, revision)


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a readable safetensors index ({exc})") from exc
    return sorted(set(weight_map.values()))


def _hub_files(source: str, revision: str) -> RevisionFiles:
    """A hub revision's files through the Hugging Face cache (downloaded on first use, as booting would)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        config = Path(hf_hub_download(source, "config.json", revision=revision))
        try:
            return RevisionFiles(revision, config, [Path(hf_hub_download(source, WEIGHTS_FILE, revision=revision))])
        except EntryNotFoundError:
            pass
        try:
            index = Path(hf_hub_download(source, INDEX_FILE, revision=revision))
        except EntryNotFoundError:
            return RevisionFiles(revision, config, None)
        return RevisionFiles(revision, config, [Path(hf_hub_download(source, name, revision=revision)) for name in _shards(index)])
    except CheckpointError:
        raise
    except Exception as exc:  # network, missing revision, ...
        raise CheckpointError(f"cannot fetch revision {revision!r} of {source}: {type(exc).__name__}: {exc}") from exc


def read_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `files`, in name order per file, read through a memory map.

    A truncated or corrupt file raises CheckpointError naming it.
    """
    from safetensors import safe_open

    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in sorted(handle.keys()):
                    yield name, handle.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # SafetensorError for a bad header, OSError/RuntimeError for missing bytes
            raise CheckpointError(f"{path} is truncated or corrupt (safetensors could not read it: {exc})") from exc


def hash_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in the order given (name order)."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # no copy for CPU tensors
    return digest.hexdigest()


def revision_hash(source: str, revision: str, local: bool) -> str | None:
    """The content hash of a revision's weights, read tensor by tensor (None when it has no safetensors)."""
    files = revision_files(source, revision, local)
    if files.weights is None:
        return None
    return hash_tensors(sorted(read_tensors(files.weights), key=lambda item: item[0]) if len(files.weights) > 1
                        else read_tensors(files.weights))


def architecture_of(config_path: Path) -> dict[str, Any]:
    """A revision's config.json without the keys that only record how it was saved."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is not readable JSON ({exc})") from exc
    return {k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS}


# ---------------------------------------------------------------------------- the loader


@dataclass
class RevisionWeights:
    """One revision read into memory: its tensors (by checkpoint name), content hash and architecture."""

    step: int
    revision: str
    files: RevisionFiles
    tensors: dict[str, torch.Tensor] | None  # None: no safetensors, the revision is booted whole
    digest: str | None
    architecture: dict[str, Any]


@dataclass
class LoadedRevision:
    """What `RevisionLoader.model_at` hands back: the model, the revision's hash, and a note on how it was loaded."""

    model: Any
    digest: str | None
    note: str | None = None


@dataclass
class RevisionLoader:
    """One booted model per series, each revision's weights copied into it, the next one read ahead.

    Args:
        references: step -> (source, revision, local) of every checkpoint the loader may be asked for.
        device, dtype: where and in what precision the model's weights live.
        hashes: step -> content hash already stored for the run (hashed at import): not computed again.
    """

    references: dict[int, tuple[str, str, bool]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    hashes: dict[int, str] = field(default_factory=dict)
    model: Any = None
    _targets: dict[str, tuple[torch.nn.Module, str]] = field(default_factory=dict)  # checkpoint name -> (module, attribute)
    _split: list[torch.nn.Module] = field(default_factory=list)  # fused-QKV attention bridges: q, k, v re-split after a copy
    _whole: bool = False  # True: this bridge cannot take weights in place; every revision is booted
    note: str | None = None
    _architecture: dict[str, Any] | None = None
    _loaded_step: int | None = None
    _digest: str | None = None
    _ahead: tuple[int, Future] | None = None
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="phaselens-read-ahead"))

    def read(self, step: int) -> RevisionWeights:
        """Read (and hash) one revision's weights; CheckpointError when its files are missing or damaged."""
        if step not in self.references:
            raise CheckpointError(f"step {step} is not a checkpoint of this series")
        source, revision, local = self.references[step]
        files = revision_files(source, revision, local)
        architecture = architecture_of(files.config)
        if files.weights is None:
            return RevisionWeights(step, revision, files, None, None, architecture)
        tensors = dict(read_tensors(files.weights))
        digest = self.hashes.get(step) or hash_tensors((name, tensors[name]) for name in sorted(tensors))
        return RevisionWeights(step, revision, files, tensors, digest, architecture)

    def model_at(self, step: int, ahead: int | None = None) -> LoadedRevision:
        """The model holding revision `step`'s weights; starts reading revision `ahead` on the read-ahead thread."""
        try:
            return self._load(self._take(step))
        finally:  # also after a failed read: the sweep goes on with the next revision
            if ahead is not None and ahead != step and ahead in self.references:
                self._ahead = (ahead, self._pool.submit(self.read, ahead))

    def _take(self, step: int) -> RevisionWeights:
        """The read-ahead revision if it is `step` (waiting for it), else `step` read now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            return ahead[1].result()  # raises the read's CheckpointError here
        if ahead is not None:  # read ahead for nothing (another worker measured that step): drop it first
            ahead[1].cancel()
            try:
                ahead[1].result()
            except Exception:
                pass
            del ahead
            gc.collect()
        return self.read(step)

    def _load(self, weights: RevisionWeights) -> LoadedRevision:
        note = None
        if weights.tensors is None or self._whole:
            if weights.tensors is None:
                note = f"step {weights.step} ({weights.revision}) has no safetensors weights; booted it whole"
            self._boot_whole(weights)
            note, self.note = note or self.note, None
            digest = weights.digest or hash_tensors(sorted(self.model.original_model.state_dict().items()))
            return LoadedRevision(self.model, digest, note)
        if self.model is None or self._architecture != weights.architecture:
            if self.model is not None:
                note = (f"step {weights.step} ({weights.revision}): its architecture differs from step {self._loaded_step}'s "
                        f"({_difference(self._architecture or {}, weights.architecture)}); booted it fresh")
            self._boot(weights)
            if self._whole:
                return self._load(weights)
        if weights.digest != self._digest:  # an identical revision is already in place: nothing to copy
            self._digest = None  # until the copy is complete
            self.copy_in(weights.tensors, weights.revision)
        self._loaded_step, self._digest = weights.step, weights.digest
        return LoadedRevision(self.model, weights.digest, note)

    def copy_in(self, tensors: dict[str, torch.Tensor], revision: str = "") -> None:
        """Copy a revision's tensors (checkpoint names) into the booted model's parameters, in place."""
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name not in self._targets:
                    raise CheckpointError(f"revision {revision}: tensor {name} matches no parameter of the booted "
                                          f"{type(self.model.original_model).__name__}")
                module, attribute = self._targets[name]
                target = getattr(module, attribute)
                if target.shape != tensor.shape:
                    raise CheckpointError(f"revision {revision}: {name} has shape {tuple(tensor.shape)}, "
                                          f"the model expects {tuple(target.shape)}")
                target.copy_(tensor)
            _refresh_split_qkv(self._split)

    def _boot_whole(self, weights: RevisionWeights) -> None:
        """Boot the revision with its own weights (no safetensors, or a bridge whose weights cannot be swapped)."""
        from phaselens.models.hf import boot_revision

        source, revision, local = self.references[weights.step]
        booted = self.model is not None
        self.model, self._targets, self._split, self._architecture, self._digest = None, {}, [], None, None
        if booted:
            gc.collect()
        self.model = boot_revision(source, revision, local, device=self.device, dtype=self.dtype)
        self._loaded_step = weights.step

    def _boot(self, weights: RevisionWeights) -> None:
        """Build the revision's architecture once, without its weights (they are copied in next)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from phaselens.models.hf import boot_revision

        source, revision, local = self.references[weights.step]
        booted, self.model, self._targets, self._split = self.model is not None, None, {}, []
        if booted:  # free the previous architecture's weights before building the next (a full collection costs ~0.5 s)
            gc.collect()
        config = AutoConfig.from_pretrained(str(weights.files.config.parent))
        with _no_init():  # every weight is copied in next: drawing random ones first is wasted time
            hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=self.dtype)
        own = {id(p) for p in hf_model.parameters()}
        # The bridge wraps the model's modules but keeps them (and their parameters): copying into
        # a module's own attribute updates the bridge.
        self._targets = _checkpoint_targets(hf_model, weights.tensors or {})
        self.model = boot_revision(source, revision, local, device=self.device, dtype=self.dtype, hf_model=hf_model)
        self._split = [m for m in self.model.modules() if callable(getattr(m, "split_qkv_matrix", None))
                       and all(getattr(m, part, None) is not None for part in "qkv")]
        derived = {id(p) for m in self._split for part in "qkv" for p in getattr(m, part).parameters()}
        copies = [name for name, p in self.model.named_parameters() if id(p) not in own | derived]
        self._whole = bool(copies)
        if self._whole:  # weights the bridge copied at boot in a way phaselens cannot redo: boot each revision
            self.note = (f"the bridge keeps its own copies of {copies[0]} and {len(copies) - 1} more; "
                         "every revision is booted whole")
        self._architecture = weights.architecture
        self._digest = None

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)


def _checkpoint_targets(hf_model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.nn.Module, str]]:
    """Checkpoint tensor name -> (module, attribute) it loads into, transformers' key renamings applied.

    Modules, not tensors: moving the model to a device replaces buffers (and, under some torch
    settings, parameters), while the module that holds each stays the same.
    """
    modules = dict(hf_model.named_modules())
    own = {name for name, _ in hf_model.state_dict(keep_vars=True).items()}
    renamings, converters = _renamings(hf_model)
    targets: dict[str, tuple[torch.nn.Module, str]] = {}
    for name in tensors:
        key = name
        if key not in own and renamings:
            from transformers.core_model_loading import rename_source_key

            key, converter = rename_source_key(name, renamings, converters)
            if converter is not None:
                raise CheckpointError(f"{name} needs transformers' weight conversion ({converter}); phaselens cannot copy it in place")
        if key in own:
            owner, _, attribute = key.rpartition(".")
            targets[name] = (modules[owner], attribute)
    covered = {id(getattr(module, attribute)) for module, attribute in targets.values()}
    uncovered = [name for name, param in hf_model.named_parameters() if id(param) not in covered]
    if uncovered:
        raise CheckpointError(f"the checkpoint has no tensor for parameter(s) {uncovered[:3]} of {type(hf_model).__name__}")
    return targets


def _no_init():
    """transformers' switch that skips weight initialisation (a no-op context where it does not exist)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def _refresh_split_qkv(modules: list[torch.nn.Module]) -> None:
    """Re-split each fused QKV weight into the bridge's q, k, v projections (the bridge splits it once, at boot)."""
    for module in modules:
        fresh = module.split_qkv_matrix(module.original_component)
        for part, new in zip("qkv", fresh):
            linear = getattr(module, part).original_component
            linear.weight.copy_(new.weight)
            if new.bias is not None:
                linear.bias.copy_(new.bias)


def _renamings(hf_model: Any) -> tuple[list, list]:
    """transformers' checkpoint-key renamings for this model (older checkpoints' names, e.g. GPT-NeoX's embed_out)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without conversion mappings: checkpoint names are the model's own
        return [], []
    transforms = get_model_conversion_mapping(hf_model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if not isinstance(t, WeightRenaming)])


def _difference(before: dict[str, Any], after: dict[str, Any]) -> str:
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    shown = ", ".join(f"{k} {before.get(k)!r} → {after.get(k)!r}" for k in changed[:3])
    return shown + (f" and {len(changed) - 3} more" if len(changed) > 3 else "") if changed else "different tensors"
