"""The model adapter: the one place phaselens learns what a model is made of.

Probes, the post-hoc runner, the report and the dashboard ask `adapter_for(model)` and never a
model's internals; what differs between architectures lives in the adapter classes below, and an
unknown model fails here, with a message that says what is supported.

    adapter = adapter_for(model)            # a phaselens Transformer, a BDH, or any TransformerBridge

| what                         | ModelAdapter member                      | value / shape                                   |
|------------------------------|------------------------------------------|-------------------------------------------------|
| architecture                 | `kind`, `architecture`                   | "transformer" / "bridge" / "bdh"; a class name   |
| dimensions                   | `n_layers n_heads d_model d_head d_vocab n_ctx` | ints (`d_head` 0 where heads have none)  |
| where the weights live       | `device`, `dtype`                        | torch.device, torch.dtype                       |
| softmax attention patterns   | `has_attention`, `pattern_hook(l)`       | bool; `blocks.{l}.attn.hook_pattern` (B, H, Q, K) |
| per-head mixed values        | `z_hook(l)`                              | `blocks.{l}.attn.hook_z` (B, T, H, d_head)       |
| MLP blocks                   | `has_mlp(l)`, `mlp_layers`, `mlp_out_hook(l)` | bool; tuple of layers; `blocks.{l}.hook_mlp_out` |
| token embedding hook         | `embed_hook`                             | `hook_embed` (B, T, d_model)                    |
| residual stream ℓ            | `residual_sites`                         | n_layers + 1 `ResidualSite(index, hook, label)`: 0 = embeddings, ℓ = after block ℓ−1 (see `models.sites`) |
| after the final norm         | `final_norm_site`                        | `ResidualSite` of `ln_final.hook_normalized`, or None |
| final norm, unembedding      | `final_norm(x)`, `unembed(x)`, `logits_from(x)` | (..., d_model) -> (..., d_model) / (..., d_vocab) |
| embedding, unembedding       | `embedding()`, `unembedding()`           | W_E (d_vocab, d_model), W_U (d_model, d_vocab)  |
| per-head weights             | `head_weights()`                         | `HeadWeights` W_Q W_K W_V (L, H, d_model, d_head), W_O (L, H, d_head, d_model); None without heads |
| hook points                  | `hook_points`                            | {name: HookPoint}                               |
| forward passes               | `logits(tokens)`, `run_with_cache(tokens, names)`, `run_with_hooks(tokens, hooks)`, `activations(tokens, names)` | (B, T, d_vocab); and {name: activation}; `activations` stops after the last hook point asked for |
| text <-> ids                 | `tokenizer`                              | `Tokenizer`: `kind` ("bytes" / "ids" / "hf"), `encode`, `decode`, `labels`, `special_ids`, `ordinary_ids()` |
| optional fast paths          | `capabilities` ⊆ `FAST_PATHS`            | frozenset of names; call them on the adapter    |
| parts probes may need        | `offers` ⊆ `models.config.MODEL_PARTS`   | frozenset of names (`probes.plan` checks `Needs.parts` against it) |
| the circuits graph           | `graph_sites()`, `graph_session()`       | `GraphSites` (node outputs, per-head q/k/v inputs); a context that turns those hook points on |

Fast paths (`adapter.supports(name)` before calling; calling an undeclared one raises):
  `residual_streams(tokens, n_blocks)`  residual streams 0..n_blocks (all of them by default): each (B, T, d_model)
  `stream_from(resid, layer, at)`       the last block's output from the stream entering block `layer`
  `forward_from(resid, layer, at)`      logits from the stream entering block `layer`; `at` = (rows, cols) computes those positions only
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from phaselens.errors import PhaselensError
from phaselens.models.sites import ResidualSite, final_norm_site, residual_sites

FAST_PATHS = ("residual_streams", "stream_from", "forward_from")


class UnsupportedModel(PhaselensError, TypeError):
    """A model phaselens has no adapter for, or a capability the model's adapter does not declare."""


@dataclass(frozen=True)
class HeadWeights:
    """Per-head weights of every layer; grouped keys and values are repeated to one per query head."""

    W_Q: torch.Tensor  # (L, H, d_model, d_head)
    W_K: torch.Tensor  # (L, H, d_model, d_head)
    W_V: torch.Tensor  # (L, H, d_model, d_head)
    W_O: torch.Tensor  # (L, H, d_head, d_model)


@dataclass(frozen=True)
class GraphSites:
    """Where the circuits graph (`probes.edge_graph`) reads each node's output and patches each node's input.

    Inputs are hooked before the norm that reads them, so a patched input is normalised as the model
    normalises its own. Outputs exclude constant biases, which cancel in every clean − corrupt difference.
    """

    embed_out: str  # the stream entering block 0 (B, T, d_model): the `embed` node's output
    head_out: tuple[str, ...]  # per layer: per-head outputs (B, T, H, d_model)
    head_in: tuple[dict[str, str], ...]  # per layer: {"q" | "k" | "v": per-head input (B, T, H, d_model)}
    mlp_in: dict[int, str]  # MLP layer -> its input (B, T, d_model)
    mlp_out: dict[int, str]  # MLP layer -> its output (B, T, d_model)
    logits_in: str  # the stream entering the final norm (B, T, d_model)
    parallel: bool = False  # the MLP reads the block's input, not the stream after its attention (GPT-NeoX, GPT-J)


COMPONENT_KINDS = ("heads", "mlps", "layers", "embeddings")  # what `component_parameters()` returns, by kind


@dataclass(frozen=True)
class ComponentParameters:
    """One component's share of a model's weights (the weight-refined LLC samples only these).

    `masks` maps a parameter's name (its first name in `model.named_parameters()`) to a bool mask of
    its shape; a parameter not listed lies outside the component.
    """

    name: str  # "L1H0", "L1 MLP", "L1", "embed", "unembed"
    kind: str  # one of COMPONENT_KINDS
    layer: int | None
    head: int | None
    masks: dict[str, torch.Tensor]
    note: str = ""  # what the subset holds where that is not obvious (shared keys and values, shared weights)

    @property
    def size(self) -> int:
        """d′: how many weights the component holds."""
        return sum(int(m.sum()) for m in self.masks.values())


def _whole(model: torch.nn.Module, modules: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Every parameter of `modules` (modules or parameters of `model`), whole, by its name in `model`."""
    ids = {id(p) for m in modules if m is not None
           for p in ([m] if isinstance(m, torch.nn.Parameter) else m.parameters())}
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if id(p) in ids}


def _indexed(shape: Sequence[int], flat_index: torch.Tensor) -> torch.Tensor:
    """A bool mask of `shape` holding the entries whose flat indices are given."""
    mask = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.bool)
    mask[flat_index.reshape(-1).long()] = True
    return mask.view(*shape)


# ---------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """Text <-> token ids for one model: `encode` what a user typed, `labels` to show tokens."""

    kind: ClassVar[str] = ""

    def __init__(self, d_vocab: int):
        self.d_vocab = d_vocab

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that never stand for text (end of text, padding): kept out of random probe batches."""
        return frozenset()

    @property
    def n_tokens(self) -> int:
        """How many ids the tokenizer can produce (an embedding may be padded beyond them)."""
        return self.d_vocab

    def ordinary_ids(self) -> list[int]:
        """The ids that stand for text: every id the tokenizer produces but the special ones."""
        special = self.special_ids
        return [i for i in range(min(self.n_tokens, self.d_vocab)) if i not in special]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def labels(self, ids: Sequence[int]) -> list[str]:
        """How each token is shown (on attention axes, say)."""
        return [str(int(i)) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of a sequence of ids."""
        return " ".join(self.labels(ids))


class IdTokenizer(Tokenizer):
    """Models whose tokens are plain ids (the induction task): text is ids separated by spaces or commas."""

    kind = "ids"

    def encode(self, text: str) -> list[int]:
        parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
        if not all(re.fullmatch(r"\d+", p) for p in parts):
            raise ValueError(f"this model has {self.d_vocab} tokens: type token ids (0–{self.d_vocab - 1}) separated by spaces")
        ids = [int(p) for p in parts]
        bad = [i for i in ids if i >= self.d_vocab]
        if bad:
            raise ValueError(f"token ids must be below the vocabulary size {self.d_vocab}; got {bad[:5]}")
        return ids


class ByteTokenizer(Tokenizer):
    """Byte-level models (256 tokens): text is its UTF-8 bytes."""

    kind = "bytes"

    @property
    def n_tokens(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def labels(self, ids: Sequence[int]) -> list[str]:
        return [chr(i) if 32 <= i < 127 else f"\\x{int(i):02x}" for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (the one saved with the model)."""

    kind = "hf"

    def __init__(self, tokenizer: Any, d_vocab: int):
        super().__init__(d_vocab)
        self.hf = tokenizer

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.hf.all_special_ids)

    @property
    def n_tokens(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.hf(text, add_special_tokens=False)["input_ids"]]

    def labels(self, ids: Sequence[int]) -> list[str]:
        return [self.hf.decode([int(i)]) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids])


# ---------------------------------------------------------------------------- adapters


class _Captured(Exception):
    """Raised by the last caching hook of `ModelAdapter.activations` to end the forward there."""


class ModelAdapter:
    """What phaselens may know about a model (see the module docstring's table)."""

    kind: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    has_attention: ClassVar[bool] = True
    shared_layers: ClassVar[bool] = False  # every layer is another pass of one block's weights (BDH)
    embed_hook: ClassVar[str] = "hook_embed"

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    n_neurons: int = 0  # sparse neurons per head (BDH's N); 0 where heads have none

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None = None):
        self.model: Any = model  # its parts (cfg, blocks, ...) are the architecture's own: each subclass reads them
        self._tokenizer = tokenizer

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.architecture}: {self.n_layers} layers × {self.n_heads} heads, "
                f"d_model {self.d_model}, vocab {self.d_vocab}, context {self.n_ctx})")

    # ---- identity and placement
    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- hook names
    @property
    def hook_points(self) -> dict[str, Any]:
        return self.model.hook_dict

    def pattern_hook(self, layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    def z_hook(self, layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    def mlp_out_hook(self, layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    def has_mlp(self, layer: int) -> bool:
        return layer in self.mlp_layers

    @property
    def mlp_layers(self) -> tuple[int, ...]:
        return ()

    @property
    def residual_sites(self) -> tuple[ResidualSite, ...]:
        return residual_sites(self.n_layers)

    @property
    def final_norm_site(self) -> ResidualSite | None:
        return final_norm_site(self.n_layers)

    # ---- reading predictions off a stream
    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The final norm: (..., d_model) -> (..., d_model)."""
        return self.model.ln_final(resid)

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a normalised stream: (..., d_model) -> (..., d_vocab)."""
        return self.model.unembed(resid)

    def logits_from(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream, through the final norm and the unembedding: (..., d_model) -> (..., d_vocab)."""
        return self.unembed(self.final_norm(resid))

    def embedding(self) -> torch.Tensor:
        """W_E: (d_vocab, d_model)."""
        return self.model.W_E

    def unembedding(self) -> torch.Tensor:
        """W_U: (d_model, d_vocab)."""
        return self.model.W_U

    def head_weights(self) -> HeadWeights | None:
        return None

    def component_parameters(self) -> list[ComponentParameters]:
        """Each head, MLP, layer and the embeddings/unembedding as parameter masks (`ComponentParameters`)."""
        raise UnsupportedModel(f"{self.architecture} ({self.kind}) has no component map, so the llc probe measures it "
                               "whole (components=model); components run on phaselens transformers, BDH and "
                               "TransformerBridge models")

    # ---- forward passes
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's output: tokens (B, T) -> logits (B, T, d_vocab)."""
        return self.model(tokens)

    def run_with_cache(self, tokens: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, T, d_vocab) and the activations at `names` (only those are kept)."""
        logits, cache = self.model.run_with_cache(tokens, names_filter=list(names))
        return logits, {name: cache[name] for name in names}

    def run_with_hooks(self, tokens: torch.Tensor, hooks: Sequence[tuple[str, Any]]) -> torch.Tensor:
        """Logits with TransformerLens-style hooks `fn(activation, hook)` on named hook points for this call."""
        return self.model.run_with_hooks(tokens, fwd_hooks=list(hooks))

    def activations(self, tokens: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The activations at `names` without the logits: the forward stops as soon as the last of them is computed.

        For a batch whose probes read no logits (head scores read only the attention patterns), the
        layers after the last hook point, the final norm and the unembedding are never run.
        """
        cache: dict[str, torch.Tensor] = {}
        if not names:
            return cache
        wanted = len(set(names))

        def keeper(name: str) -> Callable[[torch.Tensor, Any], None]:
            def keep(activation: torch.Tensor, hook: Any) -> None:
                cache[name] = activation.detach()
                if len(cache) == wanted:
                    raise _Captured  # everything asked for is here: the rest of the forward is wasted work
            return keep

        try:
            self.run_with_hooks(tokens, [(name, keeper(name)) for name in dict.fromkeys(names)])
        except _Captured:
            pass
        return {name: cache[name] for name in names}

    @property
    def offers(self) -> frozenset[str]:
        """The `MODEL_PARTS` this model has: what the measurement plan checks a probe's `Needs.parts` against."""
        parts = {"final_norm", "residual_patching"}
        if self.has_attention and self.pattern_hook(0) in self.hook_points:
            parts.add("attention_patterns")
        if self.mlp_layers:
            parts.add("mlp_neurons")
        if type(self).graph_sites is not ModelAdapter.graph_sites:
            parts.add("edge_graph")
        return frozenset(parts)

    def own_config(self) -> Any | None:
        """The phaselens model config this model is built from (it loads back from run.json), or None."""
        return self.model.cfg if self.kind in ("transformer", "bdh") else None

    # ---- the circuits graph
    def graph_sites(self) -> GraphSites:
        """Hook points of the circuits graph: node outputs and per-head q/k/v inputs (`GraphSites`)."""
        raise UnsupportedModel(f"{self.architecture} ({self.kind}) has no per-head outputs and q/k/v inputs to patch, so "
                               "phaselens builds no circuits graph for it; the circuits probe runs on phaselens "
                               "transformers and TransformerBridge models")

    def graph_session(self) -> AbstractContextManager[Any]:
        """A context in which the hook points of `graph_sites()` are computed (some models build them only on request)."""
        return nullcontext()

    # ---- tokenizer
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._default_tokenizer()
        return self._tokenizer

    def _default_tokenizer(self) -> Tokenizer:
        return ByteTokenizer(self.d_vocab) if self.d_vocab == 256 else IdTokenizer(self.d_vocab)

    # ---- fast paths
    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def _require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise UnsupportedModel(f"{self.architecture} does not offer the fast path {capability!r} "
                                   f"(it offers: {', '.join(sorted(self.capabilities)) or 'none'})")

    def residual_streams(self, tokens: torch.Tensor, n_blocks: int | None = None) -> list[torch.Tensor]:
        self._require("residual_streams")
        return self.model.residual_streams(tokens, n_blocks)

    def stream_from(self, resid: torch.Tensor, layer: int, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        self._require("stream_from")
        return self.model.stream_from(resid, layer, at)

    def forward_from(self, resid: torch.Tensor, layer: int, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        self._require("forward_from")
        return self.model.forward_from(resid, layer, at)


class TransformerAdapter(ModelAdapter):
    """phaselens's own `Transformer`: every fast path, per-head weights in TransformerLens shapes."""

    kind = "transformer"
    capabilities = frozenset(FAST_PATHS)

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None = None):
        super().__init__(model, tokenizer)
        cfg = self.model.cfg
        self.n_layers, self.n_heads, self.d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
        self.d_head, self.d_vocab, self.n_ctx = cfg.d_head, cfg.d_vocab, cfg.n_ctx

    @property
    def mlp_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, block in enumerate(self.model.blocks) if block.has_mlp)

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.W_E.dtype

    def head_weights(self) -> HeadWeights:
        attn = [block.attn for block in self.model.blocks]
        return HeadWeights(*(torch.stack([getattr(a, name) for a in attn]) for name in ("W_Q", "W_K", "W_V", "W_O")))

    def component_parameters(self) -> list[ComponentParameters]:
        """Head h of layer l: row h of its W_Q, W_K, W_V, W_O, b_Q, b_K, b_V (b_O, shared by the heads, belongs to the
        layer); an MLP: W_in, b_in, W_out, b_out; a layer: everything in its block (norms included); embeddings:
        W_E, W_pos; unembedding: the final norm, W_U, b_U."""
        m, out = self.model, []
        for l, block in enumerate(m.blocks):
            for h in range(self.n_heads):
                masks = {}
                for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
                    mask = torch.zeros_like(getattr(block.attn, w), dtype=torch.bool)
                    mask[h] = True
                    masks[f"blocks.{l}.attn.{w}"] = mask
                out.append(ComponentParameters(f"L{l}H{h}", "heads", l, h, masks))
        out += [ComponentParameters(f"L{l} MLP", "mlps", l, None, _whole(m, [m.blocks[l].mlp])) for l in self.mlp_layers]
        out += [ComponentParameters(f"L{l}", "layers", l, None, _whole(m, [b])) for l, b in enumerate(m.blocks)]
        out.append(ComponentParameters("embed", "embeddings", None, None, _whole(m, [m.W_E, m.W_pos])))
        out.append(ComponentParameters("unembed", "embeddings", None, None, _whole(m, [m.ln_final, m.W_U, m.b_U])))
        return out

    def graph_sites(self) -> GraphSites:
        layers = range(self.n_layers)
        return GraphSites(
            embed_out="blocks.0.hook_resid_pre",
            head_out=tuple(f"blocks.{l}.attn.hook_result" for l in layers),
            head_in=tuple({kind: f"blocks.{l}.hook_{kind}_input" for kind in "qkv"} for l in layers),
            mlp_in={l: f"blocks.{l}.hook_mlp_in" for l in self.mlp_layers},
            mlp_out={l: f"blocks.{l}.hook_mlp_out" for l in self.mlp_layers},
            logits_in=f"blocks.{self.n_layers - 1}.hook_resid_post")  # the final norm is its only reader


class BridgeAdapter(ModelAdapter):
    """Any Hugging Face causal LM wrapped by TransformerLens's `TransformerBridge` (GPT-2, GPT-NeoX, Llama, ...)."""

    kind = "bridge"

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None = None):
        super().__init__(model, tokenizer)
        cfg = self.model.cfg
        self.n_layers, self.n_heads, self.d_model = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_model)
        self.d_head, self.d_vocab, self.n_ctx = int(cfg.d_head), int(cfg.d_vocab), int(cfg.n_ctx)

    @property
    def architecture(self) -> str:
        return type(self.model.original_model).__name__

    @property
    def mlp_layers(self) -> tuple[int, ...]:
        if getattr(self.model.cfg, "attn_only", False):
            return ()
        return tuple(layer for layer in range(self.n_layers) if self.mlp_out_hook(layer) in self.hook_points)

    def embedding(self) -> torch.Tensor:
        return self.model.W_E

    def unembedding(self) -> torch.Tensor:
        return self.model.W_U

    def head_weights(self) -> HeadWeights:
        def per_head(w: torch.Tensor) -> torch.Tensor:  # (L, H_kv, ...) -> (L, H, ...): grouped-query keys and values
            return w if w.shape[1] == self.n_heads else w.repeat_interleave(self.n_heads // w.shape[1], dim=1)

        m = self.model
        return HeadWeights(m.W_Q, per_head(m.W_K), per_head(m.W_V), m.W_O)

    def component_parameters(self) -> list[ComponentParameters]:
        """Head h: its slices of the split q, k, v, o weights and q, k, v biases (and of a joint qkv weight that holds
        the same values, as GPT-2's does), found by passing index tensors through the bridge's own per-head reshapes,
        so any weight layout maps the way `W_Q` ... `W_O` read it. Grouped-query models (Llama with fewer K/V heads):
        query head h's subset holds the K and V slices of its group, which the group's other query heads share,
        so their subsets overlap there. MLPs, layers, embeddings and unembedding (with the final norm): whole modules."""
        m, out = self.model, []
        names = {id(p): name for name, p in m.named_parameters()}
        for l, block in enumerate(m.blocks):
            slices = _bridge_head_slices(block.attn, self.n_heads, names)  # head -> {name: mask}
            grouped = int(getattr(m.cfg, "n_key_value_heads", None) or self.n_heads) < self.n_heads
            note = "K and V shared with the other query heads of its group" if grouped else ""
            out += [ComponentParameters(f"L{l}H{h}", "heads", l, h, slices[h], note) for h in range(self.n_heads)]
        out += [ComponentParameters(f"L{l} MLP", "mlps", l, None, _whole(m, [m.blocks[l].mlp])) for l in self.mlp_layers]
        out += [ComponentParameters(f"L{l}", "layers", l, None, _whole(m, [b])) for l, b in enumerate(m.blocks)]
        out.append(ComponentParameters("embed", "embeddings", None, None,
                                       _whole(m, [m.embed, getattr(m, "pos_embed", None)])))
        out.append(ComponentParameters("unembed", "embeddings", None, None, _whole(m, [m.ln_final, m.unembed])))
        return out

    def graph_sites(self) -> GraphSites:
        layers = range(self.n_layers)
        return GraphSites(
            embed_out="blocks.0.hook_in",
            head_out=tuple(f"blocks.{l}.attn.hook_result" for l in layers),
            head_in=tuple({kind: f"blocks.{l}.attn.hook_{kind}_input" for kind in "qkv"} for l in layers),
            mlp_in={l: f"blocks.{l}.hook_mlp_in" for l in self.mlp_layers},
            mlp_out={l: f"blocks.{l}.mlp.hook_out" for l in self.mlp_layers},
            logits_in="ln_final.hook_in", parallel=bool(getattr(self.model.cfg, "parallel_attn_mlp", False)))

    @contextmanager
    def graph_session(self) -> Iterator[None]:
        """The bridge builds per-head results and q/k/v inputs only when asked (`use_attn_result`, `use_split_qkv_input`)."""
        cfg, switches = self.model.cfg, ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")
        before = {name: bool(getattr(cfg, name, False)) for name in switches}
        for name in switches:
            getattr(self.model, f"set_{name}")(True)
        try:
            yield
        finally:
            for name, value in before.items():
                getattr(self.model, f"set_{name}")(value)

    def _default_tokenizer(self) -> Tokenizer:
        hf = getattr(self.model, "tokenizer", None)
        return HFTokenizer(hf, self.d_vocab) if hf is not None else super()._default_tokenizer()


class BDHAdapter(ModelAdapter):
    """BDH: shared weights applied `n_layers` times, linear attention (no softmax pattern), byte tokens.

    Its residual stream ℓ ≥ 1 is the output of pass ℓ−1; stream 0 is the token embedding before the
    first LayerNorm. There is no final norm (every pass ends normalised) and no per-head W_Q.
    """

    kind = "bdh"
    has_attention = False
    shared_layers = True

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None = None):
        super().__init__(model, tokenizer)
        cfg = self.model.cfg
        self.n_layers, self.n_heads, self.d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
        self.d_head, self.d_vocab, self.n_ctx = 0, cfg.d_vocab, cfg.n_ctx
        self.n_neurons = cfg.n_neurons  # per head; every pass has n_heads·N of them

    @property
    def residual_sites(self) -> tuple[ResidualSite, ...]:
        return (ResidualSite(0, "hook_embed", "embeddings"),) + residual_sites(self.n_layers)[1:]

    @property
    def final_norm_site(self) -> None:
        return None

    @property
    def offers(self) -> frozenset[str]:
        return frozenset({"mlp_neurons"})  # as `BDHConfig.offers`: sparse neurons, no softmax pattern, no final norm

    def pattern_hook(self, layer: int) -> str:
        raise UnsupportedModel("BDH's linear attention has no softmax pattern (no blocks.{l}.attn.hook_pattern)")

    def z_hook(self, layer: int) -> str:
        raise UnsupportedModel("BDH has no per-head mixed values (no blocks.{l}.attn.hook_z)")

    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        return resid  # every pass already ends in a LayerNorm

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        return resid @ self.model.lm_head  # (..., d_vocab)

    def embedding(self) -> torch.Tensor:
        return self.model.embed.weight

    def unembedding(self) -> torch.Tensor:
        return self.model.lm_head

    def component_parameters(self) -> list[ComponentParameters]:
        """BDH's own components. Head h: its N neurons' encoder[h], encoder_v[h] and decoder rows h·N..(h+1)·N; every
        pass shares them (BDH has one set of weights), so heads are stored at layer 0 and there are no per-layer or
        MLP components. Embeddings: the token embedding; unembedding: lm_head."""
        m, N = self.model, self.model.cfg.n_neurons
        out = []
        for h in range(self.n_heads):
            enc, enc_v, dec = (torch.zeros_like(p, dtype=torch.bool) for p in (m.encoder, m.encoder_v, m.decoder))
            enc[h], enc_v[h], dec[h * N:(h + 1) * N] = True, True, True
            out.append(ComponentParameters(f"H{h}", "heads", 0, h, {"encoder": enc, "encoder_v": enc_v, "decoder": dec},
                                           "shared by every pass"))
        out.append(ComponentParameters("embed", "embeddings", None, None, _whole(m, [m.embed])))
        out.append(ComponentParameters("unembed", "embeddings", None, None, _whole(m, [m.lm_head])))
        return out


def _bridge_head_slices(attn: Any, n_heads: int, names: dict[int, str]) -> list[dict[str, torch.Tensor]]:
    """Per query head of one bridge attention: {parameter name: bool mask} of its q, k, v, o (and joint qkv) slices."""
    slices: list[dict[str, torch.Tensor]] = [{} for _ in range(n_heads)]
    try:
        def add(param: torch.Tensor | None, per_head: torch.Tensor, kind: str) -> None:
            """per_head: (H_kind, ...) flat indices into `param`; query head h takes group h // (H / H_kind)."""
            if param is None or id(param) not in names:
                return
            groups = per_head.shape[0]
            for h in range(n_heads):
                mask = _indexed(param.shape, per_head[h // (n_heads // groups)])
                name = names[id(param)]
                slices[h][name] = slices[h][name] | mask if name in slices[h] else mask

        def index(t: torch.Tensor) -> torch.Tensor:
            return torch.arange(t.numel()).view(t.shape)

        layouts = {}
        for kind in "qkvo":
            module = getattr(attn, kind)
            layout = attn._weight_layout_in_out(module)
            layouts[kind] = layout
            heads = attn._get_n_heads(use_kv=kind in "kv") if kind in "kv" else attn._get_n_heads()
            pattern = {"pattern": "o"} if kind == "o" else {}
            add(module.weight, attn._reshape_weight_to_3d(index(module.weight), heads, in_out_layout=layout, **pattern), kind)
            bias = getattr(module, "bias", None)
            if kind != "o" and bias is not None:
                add(bias, attn._reshape_bias(index(bias), use_kv=kind in "kv"), kind)
        joint = getattr(attn, "qkv", None)
        if joint is not None and getattr(joint, "weight", None) is not None:
            _joint_slices(attn, joint, layouts, add)
    except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
        raise UnsupportedModel(f"cannot map the heads of {type(attn).__name__} to its weights ({exc}); measure "
                               "components=layers,mlps,embeddings instead") from None
    return slices


def _joint_slices(attn: Any, joint: Any, layouts: dict[str, bool | None], add: Any) -> None:
    """A joint qkv weight that holds the split q, k, v values (concatenated along its output axis): its head slices."""
    in_out = attn._weight_layout_in_out(joint)
    weight = joint.weight.T if in_out else joint.weight  # (3·width, d_model), output first
    index = torch.arange(joint.weight.numel()).view(joint.weight.shape)
    index = index.T if in_out else index
    bias = getattr(joint, "bias", None)
    start = 0
    for kind in "qkv":
        split = getattr(attn, kind).weight
        split_first = split.T if layouts[kind] else split  # (width, d_model)
        width = split_first.shape[0]
        if weight.shape[1] != split_first.shape[1] or not torch.equal(weight[start:start + width], split_first):
            return  # not a copy of the split weights: it stays outside the heads (it is still part of its layer)
        chunk = index[start:start + width]
        use_kv = kind in "kv"
        heads = attn._get_n_heads(use_kv=use_kv) if use_kv else attn._get_n_heads()
        add(joint.weight, attn._reshape_weight_to_3d(chunk.T if layouts[kind] else chunk, heads, in_out_layout=layouts[kind]), kind)
        if bias is not None:
            add(bias, attn._reshape_bias(torch.arange(bias.numel())[start:start + width], use_kv=use_kv), kind)
        start += width


class HFModelAdapter(ModelAdapter):
    """A plain Hugging Face causal LM (e.g. the model a `transformers.Trainer` trains): dimensions only.

    It has no hook points: what a probe may read comes from its forward's own outputs (attention
    patterns with `output_attentions=True`, logits), as `pl.TelemetryCallback` does. Wrap it in a
    `TransformerBridge` for everything else.
    """

    kind = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None = None):
        super().__init__(model, tokenizer)
        config = self.model.config
        self.n_layers, self.n_heads, self.d_model = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
        self.d_head = getattr(config, "head_dim", None) or self.d_model // self.n_heads
        self.d_vocab, self.n_ctx = config.vocab_size, getattr(config, "max_position_embeddings", 0) or 0

    @property
    def hook_points(self) -> dict[str, Any]:
        return {}

    @property
    def offers(self) -> frozenset[str]:
        # no hook points: a Trainer's callback reads the patterns its forward returns (output_attentions)
        return frozenset({"attention_patterns"})

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits  # (B, T, d_vocab)


# ---------------------------------------------------------------------------- lookup

def _adapter_class(model: Any) -> type[ModelAdapter] | None:
    from phaselens.models.bdh import BDH
    from phaselens.models.transformer import Transformer

    if isinstance(model, Transformer):
        return TransformerAdapter
    if isinstance(model, BDH):
        return BDHAdapter
    if type(model).__module__.startswith("transformer_lens.model_bridge"):
        from transformer_lens.model_bridge import TransformerBridge

        if isinstance(model, TransformerBridge):
            return BridgeAdapter
    if type(model).__module__.startswith("transformers."):
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            return HFModelAdapter
    return None


def adapter_for(model: Any, tokenizer: Tokenizer | None = None) -> ModelAdapter:
    """The adapter of `model` (an adapter passes through). Cheap: it reads the config, not the weights.

    Args:
        model: a phaselens `Transformer` or `BDH`, or a TransformerLens `TransformerBridge`.
        tokenizer: how text maps to this model's ids, when the default (bytes for 256 tokens,
            plain ids otherwise, a bridge's own Hugging Face tokenizer) is not it.
    """
    if isinstance(model, ModelAdapter):
        return model
    cls = _adapter_class(model)
    if cls is None:
        raise UnsupportedModel(
            f"phaselens has no model adapter for {type(model).__module__}.{type(model).__name__}; it reads phaselens "
            "Transformer and BDH models and any Hugging Face causal LM wrapped by TransformerLens "
            "(TransformerBridge.boot_transformers(name_or_dir))")
    return cls(model, tokenizer)
