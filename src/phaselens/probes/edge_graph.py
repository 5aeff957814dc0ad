"""The computational graph of a model, and edge attribution on it: exact edge patching, EAP and EAP-IG.

Nodes are `embed`, every head `L{l}H{h}`, every MLP `L{l}M` and `logits`. The input of a node is the
residual stream it reads, a sum of the outputs of the nodes before it (plus constant biases):
x_v = c + Σ_u out_u. An edge runs from a node's output to a later node's input, one per input: a head's
q, k and v inputs separately (`L0H1->L1H0.k`), an MLP's input (`L0M->L1M`), the final residual
(`L1H0->logits`). Where the adapter hooks them (`ModelAdapter.graph_sites`) is all this module knows.

For clean/corrupt pairs and a metric m (lower is better: a loss),

    exact:   x_v' = x_v − out_u(clean) + out_u(corrupt) in that one input (normalised after),
             score(u→v) = m(patched) − m(clean)                                  one forward per edge
    eap:     score(u→v) = (out_u(corrupt) − out_u(clean)) · ∂m/∂x_v  at the clean input
             (Syed et al. 2023)                        one clean forward + backward, one corrupt forward
    eap_ig:  the same with ∂m/∂x_v averaged over the inputs e_corrupt + (k/m)(e_clean − e_corrupt),
             k = 1..m, the embeddings interpolated (Hanna et al. 2024)          m forwards + backwards

A circuit C is scored by patching every edge outside it to corrupt, each node's outputs taken from the
patched run itself: faithfulness = (m(C) − m(corrupt)) / (m(clean) − m(corrupt)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from phaselens.models.adapter import GraphSites, ModelAdapter, adapter_for

METHODS = ("exact", "eap", "eap_ig")


@dataclass(frozen=True)
class GraphInput:
    """One input of a downstream node: a head's q, k or v, an MLP's input, or the logits' residual."""

    name: str  # "L1H0.k", "L1M", "logits"
    node: str  # "L1H0", "L1M", "logits"
    kind: str  # "q" | "k" | "v" | "mlp" | "logits"
    hook: str  # the hook point holding it (per head for q, k, v: (B, T, H, d_model))
    head: int | None = None


@dataclass(frozen=True)
class Edge:
    upstream: str  # a node name
    input: GraphInput

    @property
    def name(self) -> str:
        return f"{self.upstream}->{self.input.name}"

    @property
    def downstream(self) -> str:
        return self.input.node


@dataclass(frozen=True)
class Pairs:
    """Clean and corrupted tokens (B, T) each, and the predictions (B, T-1) whose clean-token loss is the metric."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    read: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """Predictions read per sequence: (B,)."""
        return self.read.sum(-1)

    def contributions(self, logits: torch.Tensor) -> torch.Tensor:
        """Each sequence's share of the metric, Σ of its losses read / N: logits (R·B, T, V) -> (R, B), summing to `loss`."""
        B = self.clean.shape[0]
        rows, cols = self.read.nonzero(as_tuple=True)  # (N,) each
        picked = logits.view(-1, B, *logits.shape[1:])[:, rows, cols].float()  # (R, N, V)
        answers = self.clean[rows, cols + 1]  # (N,)
        losses = -picked.log_softmax(-1).gather(-1, answers.expand(picked.shape[0], -1)[..., None])[..., 0]  # (R, N)
        shares = losses.new_zeros(picked.shape[0], B)
        return shares.index_add_(1, rows, losses) / len(rows)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean loss of the clean next tokens at the predictions read, per replica: logits (R·B, T, V) -> (R,)."""
        return self.contributions(logits).sum(-1)


class EdgeGraph:
    """The nodes, inputs and edges of an adapter's model, and the patched forwards that score them."""

    def __init__(self, model: torch.nn.Module | ModelAdapter):
        self.adapter = adapter_for(model)
        self.sites: GraphSites = self.adapter.graph_sites()
        a, sites = self.adapter, self.sites
        L, H = a.n_layers, a.n_heads
        self.nodes: list[str] = ["embed"]  # upstream nodes, in the order the forward computes them
        self._holds: list[tuple[str, int | None]] = [(sites.embed_out, None)]  # per node: the hook of its output, its head
        self.inputs: list[GraphInput] = []
        self.edges: list[Edge] = []
        self._reads: dict[str, list[int]] = {}  # input name -> the upstream node indices it reads
        for layer in range(L):
            before = list(range(len(self.nodes)))  # every node of earlier layers
            for head in range(H):
                for kind in "qkv":
                    self._add(GraphInput(f"L{layer}H{head}.{kind}", f"L{layer}H{head}", kind, sites.head_in[layer][kind], head), before)
            self.nodes += [f"L{layer}H{head}" for head in range(H)]
            self._holds += [(sites.head_out[layer], head) for head in range(H)]
            if layer in sites.mlp_in:
                reads = before if sites.parallel else list(range(len(self.nodes)))
                self._add(GraphInput(f"L{layer}M", f"L{layer}M", "mlp", sites.mlp_in[layer]), reads)
                self.nodes.append(f"L{layer}M")
                self._holds.append((sites.mlp_out[layer], None))
        self._add(GraphInput("logits", "logits", "logits", sites.logits_in), list(range(len(self.nodes))))
        self.index = {edge.name: e for e, edge in enumerate(self.edges)}

    def _add(self, graph_input: GraphInput, reads: list[int]) -> None:
        self.inputs.append(graph_input)
        self._reads[graph_input.name] = reads
        self.edges += [Edge(self.nodes[u], graph_input) for u in reads]

    def __len__(self) -> int:
        return len(self.edges)

    @property
    def names(self) -> list[str]:
        return [edge.name for edge in self.edges]

    # ---------------------------------------------------------------- where each edge sits

    @cached_property
    def _input_sites(self) -> dict[str, tuple[list[int], list[int], torch.Tensor]]:
        """Per input hook: (upstream indices it reads, its edges, a (E_site, 2) map edge -> (upstream slot, head slot))."""
        out: dict[str, tuple[list[int], list[int], list[tuple[int, int]]]] = {}
        for e, edge in enumerate(self.edges):
            gi = edge.input
            reads = self._reads[gi.name]
            ups, edges, where = out.setdefault(gi.hook, (reads, [], []))
            edges.append(e)
            where.append((ups.index(self.nodes.index(edge.upstream)), 0 if gi.head is None else gi.head))
        return {hook: (ups, edges, torch.tensor(where, dtype=torch.long)) for hook, (ups, edges, where) in out.items()}

    def _output_hooks(self) -> dict[str, list[tuple[int, int | None]]]:
        """Hook -> [(upstream node index, head or None)] whose outputs it holds."""
        hooks: dict[str, list[tuple[int, int | None]]] = {}
        for u, (hook, head) in enumerate(self._holds):
            hooks.setdefault(hook, []).append((u, head))
        return hooks

    # ---------------------------------------------------------------- forwards

    def outputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every upstream node's output (U, B, T, d_model) and the logits (B, T, V), with no autograd."""
        store: dict[int, torch.Tensor] = {}
        with torch.no_grad(), self.adapter.graph_session():
            logits = self.adapter.run_with_hooks(tokens, self._capture(store))
        return torch.stack([store[u] for u in range(len(self.nodes))]), logits

    def _capture(self, store: dict[int, torch.Tensor]) -> list[tuple[str, Callable]]:
        def keeper(members):
            def keep(act, hook):
                for u, head in members:
                    store[u] = act if head is None else act[:, :, head]
            return keep
        return [(hook, keeper(members)) for hook, members in self._output_hooks().items()]

    def patched_loss(self, pairs: Pairs, corrupt_out: torch.Tensor, patch: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
        """The metric with, in replica r, every edge e with patch[r, e] = 1 patched to corrupt: patch (R, E) -> (R,)
        (per_sequence: each sequence's share of it, (R, B), `Pairs.contributions`).

        Each patched input takes out_u(corrupt) − out_u(this run) for each of its patched edges, so the
        outputs of upstream nodes are the patched run's own (a circuit's nodes see a partly corrupted input).
        """
        R, B = patch.shape[0], pairs.clean.shape[0]
        tokens = pairs.clean.repeat(R, 1)  # (R·B, T)
        current: dict[int, torch.Tensor] = {}
        patch = patch.to(corrupt_out.dtype)

        def patcher(ups: list[int], edges: list[int], where: torch.Tensor):
            # weights (R, U_site, H_site): how much of each upstream difference goes into each head's copy
            n_heads = int(where[:, 1].max()) + 1
            weights = corrupt_out.new_zeros(R, len(ups), n_heads)
            weights[:, where[:, 0].to(patch.device), where[:, 1].to(patch.device)] = patch[:, edges]
            # per upstream node, the replicas that patch it: exact patching patches one edge per replica, so each
            # node's difference is computed for its own few replicas, not for all R (the cost grows with R, not R·U)
            users = {slot: rows.nonzero().squeeze(-1) for slot in range(len(ups)) if (rows := weights[:, slot].any(-1)).any()}

            def patch_input(act, hook):
                if not users:
                    return act
                delta = act.new_zeros(R, B, act.shape[1], n_heads, act.shape[-1])  # (R, B, T, H, d)
                for slot, rows in users.items():  # one upstream node at a time: memory (R, B, T, H, d), not that times U
                    u = ups[slot]
                    diff = corrupt_out[u][None] - current[u].reshape(R, B, *current[u].shape[1:])[rows]  # (r, B, T, d)
                    delta.index_add_(0, rows, diff[:, :, :, None, :] * weights[rows, slot, None, None, :, None])
                if act.dim() == 3:  # an MLP's or the logits' input: one copy of the stream
                    delta = delta[..., 0, :]
                return act + delta.reshape(act.shape)
            return patch_input

        hooks = self._capture(current) + [(hook, patcher(*site)) for hook, site in self._input_sites.items()]
        with torch.no_grad(), self.adapter.graph_session():
            logits = self.adapter.run_with_hooks(tokens, hooks)
        shares = pairs.contributions(logits)  # (R, B)
        return shares if per_sequence else shares.sum(-1)

    def gradients(self, pairs: Pairs, clean_embed: torch.Tensor, corrupt_embed: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
        """∂m/∂input at every input hook, the embeddings set to corrupt + alpha·(clean − corrupt): hook -> grad."""
        inputs: dict[str, torch.Tensor] = {}
        start = (corrupt_embed + alpha * (clean_embed - corrupt_embed)).detach().requires_grad_(True)  # (B, T, d)

        def embed(act, hook):
            return start + 0 * act  # the interpolated embeddings, as one node of the graph

        def keep(act, hook):  # a copy of its own: the input of this reader only (an MLP's input is also the residual's)
            inputs[hook.name] = act = act.clone()
            return act

        hooks = [(self.sites.embed_out, embed)] + [(hook, keep) for hook in self._input_sites]
        with torch.inference_mode(False), torch.enable_grad(), self.adapter.graph_session():
            metric = pairs.loss(self.adapter.run_with_hooks(pairs.clean, hooks))[0]
            names = list(inputs)
            grads = torch.autograd.grad(metric, [inputs[n] for n in names], allow_unused=True)
        return {n: (torch.zeros_like(inputs[n]) if g is None else g).detach() for n, g in zip(names, grads)}

    # ---------------------------------------------------------------- scores

    def attribution(self, pairs: Pairs, steps: int = 1, clean_out: torch.Tensor | None = None,
                    corrupt_out: torch.Tensor | None = None) -> torch.Tensor:
        """EAP (steps=1) or EAP-IG (steps=m) score of every edge: (E,)."""
        return self.attribution_per_sequence(pairs, steps, clean_out, corrupt_out).sum(-1)

    def attribution_per_sequence(self, pairs: Pairs, steps: int = 1, clean_out: torch.Tensor | None = None,
                                 corrupt_out: torch.Tensor | None = None) -> torch.Tensor:
        """EAP / EAP-IG scores split by the sequence each term comes from: (E, B), summing to `attribution`.

        One clean and one corrupt forward (no autograd), then `steps` forwards + backwards, whatever the edge count.
        """
        if clean_out is None:
            clean_out, _ = self.outputs(pairs.clean)
        if corrupt_out is None:
            corrupt_out, _ = self.outputs(pairs.corrupt)
        diff = corrupt_out - clean_out  # (U, B, T, d)
        total: dict[str, torch.Tensor] = {}
        for k in range(1, steps + 1):
            for hook, grad in self.gradients(pairs, clean_out[0], corrupt_out[0], k / steps).items():
                total[hook] = total.get(hook, 0) + grad / steps
        scores = torch.zeros(len(self.edges), diff.shape[1], dtype=torch.float32, device=diff.device)  # (E, B)
        for hook, (ups, edges, where) in self._input_sites.items():
            grad = total[hook].float()
            grad = grad if grad.dim() == 4 else grad[:, :, None]  # (B, T, H_site, d)
            per = torch.einsum("ubtd,bthd->ubh", diff[ups].float(), grad)  # (U_site, B, H_site)
            scores[edges] = per[where[:, 0], :, where[:, 1]]
        return scores

    def exact(self, pairs: Pairs, corrupt_out: torch.Tensor | None = None, clean_shares: torch.Tensor | None = None,
              rows: int = 4096) -> torch.Tensor:
        """Exact edge patching of every edge, one patched forward each (batched `rows` sequences at a time): (E,)."""
        return self.exact_per_sequence(pairs, corrupt_out, clean_shares, rows).sum(-1)

    def exact_per_sequence(self, pairs: Pairs, corrupt_out: torch.Tensor | None = None, clean_shares: torch.Tensor | None = None,
                           rows: int = 4096) -> torch.Tensor:
        """Exact scores split by sequence, each sequence's share of metric(patched) − metric(clean): (E, B)."""
        if corrupt_out is None:
            corrupt_out, _ = self.outputs(pairs.corrupt)
        if clean_shares is None:
            clean_shares = pairs.contributions(self.outputs(pairs.clean)[1])[0]  # (B,)
        eye = torch.eye(len(self.edges), device=corrupt_out.device)  # replica e patches edge e
        chunks = [self.patched_loss(pairs, corrupt_out, chunk, per_sequence=True) for chunk in eye.split(self._chunk(pairs, rows))]
        return torch.cat(chunks) - clean_shares

    def _chunk(self, pairs: Pairs, rows: int) -> int:
        return max(1, rows // pairs.clean.shape[0])

    def scores(self, pairs: Pairs, methods: tuple[str, ...] = METHODS, steps: int = 5, rows: int = 4096) -> "GraphScores":
        """Clean and corrupt metrics and every edge's score by each of `methods`."""
        clean_out, clean_logits = self.outputs(pairs.clean)
        corrupt_out, corrupt_logits = self.outputs(pairs.corrupt)
        clean_shares, corrupt_shares = pairs.contributions(clean_logits)[0], pairs.contributions(corrupt_logits)[0]  # (B,) each
        per_sequence = {}
        for method in methods:
            if method == "exact":
                per_sequence[method] = self.exact_per_sequence(pairs, corrupt_out, clean_shares, rows)
            elif method in ("eap", "eap_ig"):
                per_sequence[method] = self.attribution_per_sequence(pairs, 1 if method == "eap" else steps, clean_out, corrupt_out)
            else:
                raise ValueError(f"edge scoring method must be one of {METHODS}, got {method!r}")
        return GraphScores(self, pairs, corrupt_out, float(clean_shares.sum()), float(corrupt_shares.sum()),
                           {m: s.sum(-1) for m, s in per_sequence.items()}, per_sequence, clean_shares, corrupt_shares)


MIN_EFFECT = 0.02  # nats: a clean/corrupt gap smaller than this has no behaviour for a circuit to explain
EFFECT_SE = 3.0  # ... and so has one within this many standard errors (over the sequences) of zero


@dataclass
class GraphScores:
    """Edge scores of one model on one set of pairs, and what finds its circuit."""

    graph: EdgeGraph
    pairs: Pairs
    corrupt_out: torch.Tensor  # (U, B, T, d)
    clean_loss: float
    corrupt_loss: float
    by_method: dict[str, torch.Tensor]  # method -> (E,)
    per_sequence: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> (E, B), summing to by_method
    clean_shares: torch.Tensor | None = None  # (B,): each sequence's share of m(clean)
    corrupt_shares: torch.Tensor | None = None  # (B,)

    @property
    def effect_se(self) -> float:
        """Standard error of m(clean) − m(corrupt) over the sequences (the ratio estimator's, linearised)."""
        if self.clean_shares is None or len(self.clean_shares) < 2:
            return 0.0
        gap = self.clean_shares - self.corrupt_shares  # (B,)
        weights = self.pairs.counts.to(gap) / self.pairs.counts.sum()  # (B,)
        residual = gap - gap.sum() * weights
        B = len(gap)
        return float((residual.pow(2).sum() * B / (B - 1)).sqrt())

    @property
    def has_effect(self) -> bool:
        """Whether the corruption moves the metric clearly: |m(clean) − m(corrupt)| > MIN_EFFECT and > EFFECT_SE·SE.

        Without it (at initialisation, or where the model has not learned the behaviour) faithfulness is 0/0:
        no circuit is claimed."""
        gap = abs(self.clean_loss - self.corrupt_loss)
        return gap > MIN_EFFECT and gap > EFFECT_SE * self.effect_se

    def faithfulness(self, patched_loss: torch.Tensor) -> torch.Tensor:
        """(m(C) − m(corrupt)) / (m(clean) − m(corrupt)): 1 where the circuit does what the model does, 0 where nothing is left."""
        gap = self.clean_loss - self.corrupt_loss
        return (patched_loss - self.corrupt_loss) / (gap if abs(gap) > 1e-12 else float("nan"))

    def circuit(self, method: str, threshold: float = 0.8, max_linear: int = 256, rows: int = 4096) -> tuple[list[int], float]:
        """The smallest top-n edge set (by |score|) whose faithfulness, measured by patching every other edge, reaches
        `threshold`: (edge indices, faithfulness). Every n up to `max_linear` is tried, beyond it n grows by 10%.
        Where the pairs show no clear effect (`has_effect`), no circuit: ([], nan)."""
        if not self.has_effect:
            return [], float("nan")
        order = self.by_method[method].abs().argsort(descending=True)  # (E,)
        E = len(order)
        sizes = list(range(1, min(E, max_linear) + 1))
        while sizes[-1] < E:
            sizes.append(min(E, max(sizes[-1] + 1, int(sizes[-1] * 1.1))))
        chunk = self.graph._chunk(self.pairs, rows)
        for start in range(0, len(sizes), chunk):
            group = sizes[start:start + chunk]
            patch = torch.ones(len(group), E, device=self.corrupt_out.device)
            for r, n in enumerate(group):
                patch[r, order[:n]] = 0
            faith = self.faithfulness(self.graph.patched_loss(self.pairs, self.corrupt_out, patch))
            hit = (faith >= threshold).nonzero()
            if len(hit):
                r = int(hit[0])
                return sorted(order[:group[r]].tolist()), float(faith[r])
        return sorted(order.tolist()), 1.0
