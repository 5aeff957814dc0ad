"""The local learning coefficient (LLC) at a checkpoint, estimated with batched SGLD chains.

`LLCEstimator` is the formula; `LLCProbe` measures it on every checkpoint of a run (post-hoc
only), on a fixed, seeded sample of the task's training data stored with the run.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from phaselens.probes.base import Measurement, Needs, Probe, ProbeInputs, register_probe
from phaselens.probes.loss import token_losses
from phaselens.tasks.batch import TaskBatch

# A loss: (call, rows) -> mean loss (), where call(*inputs) runs the model at the weights being sampled
# and rows holds one minibatch (each tensor (m, ...)).
LossFn = Callable[[Callable[..., torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]

DIVERGED_FACTOR = 3.0  # a chain whose loss exceeds 3·L_n(w*) + 1 nat has blown up
UNSETTLED_DRIFT = 0.2  # draws' second half vs first half moving by 20% of the mean excess loss: not settled
BASIN_MARGIN = 0.05  # the basin check applies where L_n(w*) beats the uniform guess by 5% of it
COMPONENTS = ("model", "heads", "mlps", "layers", "embeddings")  # values of the `components` option
COMPONENT_METRICS = {"heads": "llc", "mlps": "llc_mlp", "layers": "llc_layer"}  # rows per layer (and head)


@dataclass(frozen=True)
class SGLDOptions:
    """Settings of the SGLD chains (the `llc` probe's options; `phaselens probe --probe-option llc.KEY=V`)."""

    # ε and γ: what `llc-calibrate` recommends on the induction demo (γ = 1000, the one γ at which no ε leaves the basin;
    # at γ ≤ 100 the chains' mean loss sits above the uniform guess from the first copy-loss drop on)
    epsilon: float = 3e-4  # step size ε
    gamma: float = 1000.0  # localization strength γ
    n_beta: float | None = None  # inverse temperature nβ; default n / log n (β = 1/log n)
    chains: int = 4  # C
    draws: int = 100  # steps averaged into λ̂, after burn-in
    burnin: int = 50  # steps discarded before the draws
    batch_size: int = 8  # minibatch size m (sequences)
    n: int = 1024  # size of the training-data sample the minibatches come from
    seed: int = 0  # seeds the sample's minibatches and the chains' noise
    components: str = "model"  # comma-combinable COMPONENTS: the weight-refined LLC of each head, MLP, layer, ...
    positions: str | None = None  # a study position set: the data-refined LLC (the loss only at those positions)
    seed_per_step: bool = False  # independent chain seeds at every checkpoint (from the checkpoint's weights)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "SGLDOptions":
        """Options from a probe's keyword options, with a clear error for an unknown key or a bad value."""
        from phaselens.errors import ConfigError

        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"llc probe: unknown option(s) {unknown}; options: {', '.join(known)}")
        values = {}
        for key, raw in options.items():
            if key in ("components", "positions"):
                values[key] = None if raw in (None, "") else ",".join(raw) if isinstance(raw, (list, tuple)) else str(raw)
                continue
            if key == "seed_per_step":
                if str(raw).lower() not in ("true", "false", "1", "0"):
                    raise ConfigError(f"llc probe: option seed_per_step={raw!r} must be true or false")
                values[key] = str(raw).lower() in ("true", "1")
                continue
            cast = float if key in ("epsilon", "gamma", "n_beta") else int
            try:
                values[key] = None if raw is None else cast(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"llc probe: option {key}={raw!r} is not a number") from None
        if values.get("components") is None:
            values.pop("components", None)
        made = cls(**values)
        made.validate()
        return made

    def validate(self) -> None:
        from phaselens.errors import ConfigError

        for key in ("epsilon", "gamma", "n_beta"):  # NaN passes every comparison below: refuse it by name
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"llc probe: {key} must be a finite number, got {value}")
        positive = {"epsilon": self.epsilon, "chains": self.chains, "draws": self.draws, "batch_size": self.batch_size}
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"llc probe: {key} must be > 0, got {value}")
        if self.gamma < 0 or self.burnin < 0:
            raise ConfigError(f"llc probe: gamma and burnin must be >= 0, got gamma={self.gamma}, burnin={self.burnin}")
        if self.n < 2:
            raise ConfigError(f"llc probe: n must be >= 2 (β = 1/log n), got {self.n}")
        if not 0 <= self.seed < 2**32:  # it seeds torch generators, with offsets added
            raise ConfigError(f"llc probe: seed must be between 0 and {2**32 - 1}, got {self.seed}")
        if self.n_beta is not None and not self.n_beta > 0:
            raise ConfigError(f"llc probe: n_beta must be > 0, got {self.n_beta}")
        bad = [c for c in self.component_kinds if c not in COMPONENTS] or ([] if self.component_kinds else ["(none)"])
        if bad:
            raise ConfigError(f"llc probe: components={self.components!r}: {bad[0]} is not one of {', '.join(COMPONENTS)} "
                              "(comma-combinable, e.g. components=model,heads)")

    @property
    def component_kinds(self) -> tuple[str, ...]:
        """The `components` option as a tuple of kinds, in the order given."""
        return tuple(dict.fromkeys(c.strip() for c in self.components.split(",") if c.strip()))

    @property
    def inverse_temperature(self) -> float:
        """nβ: as given, or n / log n."""
        return float(self.n_beta) if self.n_beta is not None else self.n / math.log(self.n)


@dataclass
class LLCResult:
    """One estimate: λ̂ and its spread over chains, with the loss traces the diagnostics read."""

    llc: float  # mean over the chains that stayed finite of each chain's estimate
    llc_std: float  # standard deviation of the chains' estimates (ddof 0)
    chain_llc: list[float]
    init_loss: float  # L_n(w*)
    n_beta: float
    traces: np.ndarray  # (C, burnin + draws): minibatch loss L_m(w_t) before each step
    options: SGLDOptions
    batched: bool  # all chains in one vmapped forward/backward per step
    seconds: float
    warnings: list[str] = field(default_factory=list)
    llc_se: float = float("nan")  # standard error of `llc` over chains: std (ddof 1) / √C
    component: str = "model"  # "model", or the component's name ("L1H0", "L1 MLP", "L1", "embed")
    kind: str = "model"  # "model" or one of models.adapter.COMPONENT_KINDS
    layer: int | None = None
    head: int | None = None
    size: int = 0  # d′: the weights sampled (all of them for the model)

    def artifact(self) -> dict[str, Any]:
        """The JSON the `llc` probe writes per checkpoint (read back by `phaselens.store.llc.LLCArtifact`)."""
        return {
            "llc": self.llc, "llc_std": self.llc_std, "llc_se": self.llc_se, "component": self.component,
            "kind": self.kind, "layer": self.layer, "head": self.head, "size": self.size,
            "chain_llc": self.chain_llc, "init_loss": self.init_loss,
            "n_beta": self.n_beta, "options": asdict(self.options), "batched": self.batched,
            "seconds": round(self.seconds, 3), "warnings": self.warnings,
            "traces": [[round(v, 6) if math.isfinite(v) else None for v in row] for row in self.traces.tolist()],
        }


def chain_warnings(traces: np.ndarray, burnin: int, init_loss: float, chain_llc: np.ndarray,
                   uniform_loss: float | None = None) -> list[str]:
    """What is wrong with a set of chains, in words (empty when nothing is):

    * diverged: a chain's loss became NaN/inf or exceeded 3·L_n(w*) + 1;
    * left the basin: the mean loss of the draws (over the chains that did not diverge) is above the
      uniform guess `uniform_loss` = log(vocabulary): the sampled weights predict worse than knowing
      nothing, so they are no longer near w*'s basin (given by the probe; None skips the check). Checked
      only where w* itself beats the uniform guess by BASIN_MARGIN (L_n(w*) < 0.95·log(vocab)): near the
      start of training the checkpoint sits at the uniform guess and there is no better basin to leave;
    * λ̂ < 0: the chains found lower loss than w* (w* is not a local minimum, or ε is too large);
    * not settled: over the draws, the mean loss of the second half differs from the first half's by more
      than 20% of the mean excess loss E[L_m] − L_n(w*), clearly beyond the chains' spread.
    """
    out = []
    C = traces.shape[0]
    bad = ~np.isfinite(traces).all(axis=1) | (np.nan_to_num(traces, nan=np.inf).max(axis=1) > DIVERGED_FACTOR * init_loss + 1)
    if bad.any():
        out.append(f"{int(bad.sum())} of {C} SGLD chains diverged (loss NaN/inf or above {DIVERGED_FACTOR:g}·L_n(w*) + 1): "
                   "lower epsilon")
    good = traces[~bad, burnin:]
    if (len(good) and uniform_loss is not None and init_loss < (1 - BASIN_MARGIN) * uniform_loss
            and float(good.mean()) > uniform_loss):
        out.append(f"chains left the basin: their mean loss {float(good.mean()):.3g} is above the uniform guess "
                   f"log(vocab) = {uniform_loss:.3g} (L_n(w*) = {init_loss:.3g}): raise gamma or lower epsilon")
    if len(good):
        estimate = float(np.mean(chain_llc[~bad]))
        if estimate < 0:
            out.append(f"λ̂ = {estimate:.3g} < 0: the chains found lower loss than the checkpoint (not a local minimum, "
                       "or epsilon too large)")
        half = good.shape[1] // 2
        if half >= 2:
            drift = good[:, half:].mean(axis=1) - good[:, :half].mean(axis=1)  # (C',)
            excess = float(good.mean() - init_loss)
            noise = 3 * float(drift.std()) / math.sqrt(len(drift)) if len(drift) > 1 else 0.0
            if abs(drift.mean()) > max(UNSETTLED_DRIFT * abs(excess), noise):
                way = "rising" if drift.mean() > 0 else "falling"
                out.append(f"SGLD loss still {way} after burn-in: the second half of the draws averages {drift.mean():+.3g} "
                           f"against the first, for a mean excess loss of {excess:.3g}; raise burnin or epsilon")
    return out


class LLCEstimator:
    """Local learning coefficient at weights w* by stochastic-gradient Langevin dynamics (Lau et al. 2023).

    C chains start at w* and take `burnin + draws` steps, each on its own minibatch of m rows drawn
    with replacement from the n-sample:

        Δw = −(ε/2)·(nβ·∇L_m(w) + γ·(w − w*)) + N(0, ε),        β = 1/log n by default,

    and the estimate is the standard (unpaired) form

        λ̂ = nβ·(mean over chains and post-burn-in draws of L_m(w_t) − L_n(w*)),

    where L_m(w_t) is the minibatch loss at the chain's weights before step t (computed in the
    forward that gives the gradient) and L_n(w*) the mean loss over the whole n-sample. `llc` is
    that mean, `llc_std` the standard deviation of the per-chain estimates.

    Batched (default): the C chains' weights are one (C, P) tensor and every step is a single
    `vmap` of the model's loss through `torch.func.functional_call` and one backward, so C chains
    cost one batched forward/backward. Each chain's minibatches and noise come from its own generator,
    seeded from (seed, chain), so batched and one-after-another runs give the same chains.

    Args:
        model: any module; its parameters are w* (left unchanged).
        loss: (call, rows) -> mean loss, `call(*inputs)` running the model (see `LossFn`).
        sample: the n-sample as tensors with n rows each (the minibatches are drawn from it).
        options: the SGLD settings.
    """

    def __init__(self, model: torch.nn.Module, loss: LossFn, sample: Mapping[str, torch.Tensor], options: SGLDOptions):
        options.validate()
        self.model, self.loss, self.options = model, loss, options
        self.sample = dict(sample)
        self.n_rows = len(next(iter(self.sample.values())))
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        # Every path to a parameter (a wrapper such as TransformerBridge reaches one module by several),
        # so the sampled weights replace it wherever the forward reads it.
        first = {id(p): name for name, p in named}
        self.aliases = [(name, first[id(p)]) for name, p in model.named_parameters(remove_duplicate=False)
                        if id(p) in first and first[id(p)] != name]
        self.buffers = dict(model.named_buffers(remove_duplicate=False))
        self.device = named[0][1].device
        self.w_star = torch.cat([p.detach().reshape(-1).float() for _, p in named])  # (P,)
        self._copies: dict[str, torch.nn.Module] = {}  # working copies: the caller's model (and w*) is never touched
        self.uniform_loss: float | None = None  # log(vocab), when the loss is a next-token cross-entropy (the basin check)
        self.seed = options.seed  # the chains' seed (the probe derives one per checkpoint with seed_per_step)

    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's parameters as views of one flat weight vector (P,)."""
        params = {name: piece.view(shape) for name, piece, shape in zip(self.names, flat.split(self.sizes), self.shapes)}
        params.update({alias: params[name] for alias, name in self.aliases})
        return params

    def working_model(self, use: str) -> torch.nn.Module:
        """A copy of the model for one use ("functional" calls or "plain" in-place weights), made once.

        Two copies, because `functional_call` may leave a wrapper that reaches a parameter by several
        paths with some of them swapped; the plain copy never goes through it.
        """
        if use not in self._copies:
            import copy

            self._copies[use] = copy.deepcopy(self.model)
        return self._copies[use]

    def _loss_at(self, flat: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        params, model = self._params(flat), self.working_model("functional")
        return self.loss(lambda *inputs: torch.func.functional_call(model, (params, self.buffers), inputs, tie_weights=False), rows)

    def full_loss(self, chunk: int = 256) -> float:
        """L_n(w*): the mean minibatch loss over the n-sample in chunks (chunks weighted by rows)."""
        total = 0.0
        with torch.no_grad():
            for start in range(0, self.n_rows, chunk):
                rows = {k: v[start:start + chunk] for k, v in self.sample.items()}
                total += float(self._loss_at(self.w_star, rows)) * len(next(iter(rows.values())))
        return total / self.n_rows

    def _generators(self) -> tuple[list[torch.Generator], list[torch.Generator]]:
        """Per chain: a CPU generator for its minibatches and one on the model's device for its noise."""
        states = np.random.SeedSequence([self.seed, 0x11C]).spawn(self.options.chains)
        seeds = [int(s.generate_state(1, dtype=np.uint64)[0] >> 1) for s in states]
        rows = [torch.Generator().manual_seed(s) for s in seeds]
        noise = [torch.Generator(device=self.device).manual_seed(s + 1) for s in seeds]
        return rows, noise

    def minibatch(self, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Each chain's next minibatch of m rows, drawn with replacement from the n-sample: each tensor (C, m, ...)."""
        index = torch.stack([torch.randint(self.n_rows, (self.options.batch_size,), generator=g) for g in generators])  # (C, m)
        index = index.to(self.device)
        return {k: v[index] for k, v in self.sample.items()}

    @staticmethod
    def draw_noise(generators: list[torch.Generator], out: torch.Tensor) -> torch.Tensor:
        """Each chain's N(0, 1) noise from its own generator, into out (C, P)."""
        for c, g in enumerate(generators):
            torch.randn(out.shape[1], generator=g, device=out.device, out=out[c])
        return out

    def sgld_update(self, w: torch.Tensor, grads: torch.Tensor, noise: torch.Tensor, n_beta: float,
                    half_epsilon: torch.Tensor, gamma: torch.Tensor, root_epsilon: torch.Tensor) -> None:
        """w += −(ε/2)·(nβ·∇L_m(w) + γ·(w − w*)) + √ε·noise, in place, with ε and γ per chain.

        w, grads (consumed), noise: (C, P); half_epsilon = ε/2, gamma, root_epsilon = √ε: (C, 1).
        """
        with torch.no_grad():
            drift = grads.mul_(n_beta).addcmul_(w - self.w_star, gamma)  # (C, P)
            w.addcmul_(drift, half_epsilon, value=-1.0).addcmul_(noise, root_epsilon)

    def estimate(self, batched: bool = True, progress: Callable[[int], None] | None = None) -> LLCResult:
        """Run the chains and return λ̂; `progress(k)` is called after each step with k = steps done."""
        return self.estimate_grid([(self.options.epsilon, self.options.gamma)], batched, progress)[0]

    def estimate_grid(self, settings: Sequence[tuple[float, float]], batched: bool = True,
                      progress: Callable[[int], None] | None = None) -> list[LLCResult]:
        """λ̂ for each (ε, γ) in `settings`, all settings' chains advancing together: K·C chains in one batched step.

        Setting k runs the chains `estimate` runs with ε, γ = settings[k] (the same seeds, so the same
        minibatches and noise); the chains never interact, so its estimate is the one `estimate` gives.
        """
        chosen = [replace(self.options, epsilon=float(e), gamma=float(g)) for e, g in settings]
        return self._run([(s, None, {}) for s in chosen], batched, progress)

    def estimate_components(self, components: Sequence[Any], batched: bool = True,
                            progress: Callable[[int], None] | None = None) -> list[LLCResult]:
        """The weight-refined λ̂ of each component, every component's C chains in one batched step (G·C chains).

        A component is None (the whole model) or anything with `name`, `kind`, `layer`, `head` and `masks`
        (parameter name -> bool mask: `models.adapter.ComponentParameters`). Its chains move only the masked
        weights; every other weight stays at w* (SGLD restricted to the component, nβ, ε, γ as for the whole
        model). Chain c of every component draws the same minibatches and noise (common random numbers), so
        components differ by their weights alone.
        """
        groups = []
        for c in components:
            if c is None:
                groups.append((self.options, None, {}))
                continue
            mask = self.flat_mask(c.masks)
            groups.append((self.options, mask, {"component": c.name, "kind": c.kind, "layer": c.layer, "head": c.head,
                                                "size": int(mask.sum())}))
        return self._run(groups, batched, progress)

    def flat_mask(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A component's parameter masks (by any of a parameter's names) as one bool vector over w*: (P,)."""
        first = {alias: name for alias, name in self.aliases}
        by_name = {first.get(name, name): mask for name, mask in masks.items()}
        unknown = sorted(set(by_name) - set(self.names))
        if unknown:
            raise ValueError(f"component masks name parameters the model does not train: {unknown[:3]}")
        pieces = [by_name[name].reshape(-1).to(torch.bool) if name in by_name else torch.zeros(size, dtype=torch.bool)
                  for name, size in zip(self.names, self.sizes)]
        return torch.cat(pieces).to(self.device)  # (P,)

    def _run(self, groups: Sequence[tuple[SGLDOptions, torch.Tensor | None, dict]], batched: bool,
             progress: Callable[[int], None] | None) -> list[LLCResult]:
        """Every group's C chains together: group g = (its options' ε and γ, the mask of the weights it moves or
        None for all, labels of its result). Chain c of every group uses chain c's seeds."""
        o = self.options
        for s, _, _ in groups:
            s.validate()
        began = time.perf_counter()
        n_beta = o.inverse_temperature
        init_loss = self.full_loss()
        row_rng, noise_rng = self._generators()  # C chains' generators, shared by every group's chain c
        steps = o.burnin + o.draws
        G, C, P = len(groups), o.chains, self.w_star.numel()
        def per_chain(values: list[float]) -> torch.Tensor:  # one value per group -> (G·C, 1)
            return torch.tensor(values, dtype=self.w_star.dtype, device=self.device).repeat_interleave(C)[:, None]

        epsilon, gamma = per_chain([s.epsilon for s, _, _ in groups]), per_chain([s.gamma for s, _, _ in groups])
        half_epsilon, root_epsilon = epsilon / 2, epsilon.sqrt()
        restricted = any(m is not None for _, m, _ in groups)
        moving = (torch.stack([torch.ones(P, dtype=torch.bool, device=self.device) if m is None else m
                               for _, m, _ in groups]).repeat_interleave(C, dim=0) if restricted else None)  # (G·C, P)
        w = self.w_star.repeat(G * C, 1)  # (G·C, P)
        noise = torch.empty(C, P, device=self.device)
        traces = torch.empty(G * C, steps)
        step_fn = self._batched_step if batched else self._sequential_step
        notes = []
        with torch.inference_mode(False), torch.enable_grad():
            for t in range(steps):
                rows = self.minibatch(row_rng)  # each (C, m, ...)
                if G > 1:
                    rows = {k: v.repeat(G, *([1] * (v.dim() - 1))) for k, v in rows.items()}  # (G·C, m, ...)
                try:
                    grads, losses = step_fn(w, rows)  # (G·C, P), (G·C,)
                except (RuntimeError, NotImplementedError) as exc:  # an op without a vmap rule: one chain at a time
                    if step_fn != self._batched_step or t > 0:
                        raise
                    notes.append(f"chains ran one after another: the model does not run under torch.func.vmap ({exc})")
                    step_fn, batched = self._sequential_step, False
                    grads, losses = step_fn(w, rows)
                self.draw_noise(noise_rng, noise)
                self.sgld_update(w, grads, noise.repeat(G, 1) if G > 1 else noise, n_beta, half_epsilon, gamma, root_epsilon)
                if moving is not None:
                    torch.where(moving, w, self.w_star, out=w)  # weights outside a component stay at w*
                traces[:, t] = losses.detach().float().cpu()
                if progress is not None:
                    progress(t + 1)
        seconds = (time.perf_counter() - began) / G  # each group's share of the joint run
        traces_np = traces.numpy().astype(float)
        out = []
        for g, (s, mask, labels) in enumerate(groups):
            result = self._result(s, traces_np[g * C:(g + 1) * C], init_loss, n_beta, batched, seconds, notes,
                                  self.uniform_loss)
            out.append(replace(result, **{"size": P, **labels}))
        return out

    @staticmethod
    def _result(options: SGLDOptions, traces: np.ndarray, init_loss: float, n_beta: float, batched: bool, seconds: float,
                notes: list[str], uniform_loss: float | None = None) -> LLCResult:
        """λ̂, its spread and standard error, and the diagnostics from one group's traces (C, burnin + draws)."""
        chain_llc = n_beta * (traces[:, options.burnin:].mean(axis=1) - init_loss)  # (C,)
        warnings = notes + chain_warnings(traces, options.burnin, init_loss, chain_llc, uniform_loss)
        finite = np.isfinite(chain_llc)
        llc = float(chain_llc[finite].mean()) if finite.any() else float("nan")
        llc_std = float(chain_llc[finite].std()) if finite.sum() > 1 else 0.0 if finite.any() else float("nan")
        llc_se = float(chain_llc[finite].std(ddof=1) / math.sqrt(finite.sum())) if finite.sum() > 1 else float("nan")
        return LLCResult(llc, llc_std, [float(v) for v in chain_llc], init_loss, n_beta, traces, options, batched, seconds,
                         list(warnings), llc_se=llc_se)

    def _batched_step(self, w: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient and loss of every chain in one vmapped forward and one backward: w (C, P) -> (C, P), (C,).

        The chains are independent, so the gradient of their summed losses is each chain's own gradient;
        plain autograd through `vmap` costs less per step than a nested `grad` transform.
        """
        w = w.detach().requires_grad_(True)
        losses = torch.func.vmap(self._loss_at)(w, rows)  # (C,)
        (grads,) = torch.autograd.grad(losses.sum(), w)
        return grads, losses.detach()

    def _sequential_step(self, w: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The same step one chain after another, as a per-chain sampler does: for each chain, its weights
        copied into a working model, a plain forward and `autograd.grad`."""
        model = self.working_model("plain")
        params = [p for p in model.parameters() if p.requires_grad]
        grads, losses = [], []
        for c in range(w.shape[0]):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(w[c], params)
            loss = self.loss(model, {k: v[c] for k, v in rows.items()})
            found = torch.autograd.grad(loss, params, allow_unused=True)  # a wrapper may hold parameters its forward skips
            grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(found, params)]))
            losses.append(loss.detach())
        return torch.stack(grads), torch.stack(losses)


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Torch on one CPU thread inside the block, as in every post-hoc worker. SGLD on a small model is many small
    ops: a second thread only adds synchronisation (on the demo run, 50 s a checkpoint on two threads of a busy
    2-core machine, 5 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def masked_token_loss(call: Callable[..., torch.Tensor], rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of a task batch: mean next-token cross-entropy over `loss_mask` (rows: tokens (m, T), loss_mask (m, T-1))."""
    losses = token_losses(call(rows["tokens"]), rows["tokens"])  # (m, T-1)
    mask = rows["loss_mask"].to(losses.dtype)
    return (losses * mask).sum() / mask.sum()


@register_probe
class LLCProbe(Probe):
    """`llc`, `llc_se` (and `llc_std`) per model: the SGLD estimate of the local learning coefficient at the checkpoint
    (see `LLCEstimator`), on the run's fixed sample of n training sequences (`RunDir.training_sample`).

    `components` adds the weight-refined LLC (`LLCEstimator.estimate_components`, the subsets from the model
    adapter's `component_parameters()`): `llc`/`llc_se` per layer and head, `llc_mlp`/`llc_mlp_se` and
    `llc_layer`/`llc_layer_se` per layer, `llc_embed`/`llc_unembed` (and `_se`). `positions` restricts the
    loss to a study position set (the data-refined LLC). Post-hoc only. Options are `SGLDOptions`' fields;
    the per-chain loss traces are the artifact.
    """

    name = "llc"
    # hundreds of forward/backward passes per checkpoint: measured on checkpoints only
    needs = Needs(run_files=("training_sample",), live=False, optional_sets=("positions",))

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.settings = SGLDOptions.from_options(options)
        self.sample: TaskBatch | None = None
        self._last: tuple[int, list[LLCResult]] | None = None

    def bind_run(self, run_dir: Any) -> None:
        from phaselens.errors import RunError
        from phaselens.store.run_dir import RunDir

        path = RunDir(run_dir).training_sample(self.settings.n, self.settings.seed)
        if not path.is_file():
            raise RunError(f"{path} is missing: `phaselens probe RUN --probes llc` writes the run's training sample first")
        self.sample = TaskBatch.load(path)
        if self.settings.positions:  # a name the plan did not see (a study without declared sets): one clear line
            try:
                self.sample.predictions(self.settings.positions, "the llc probe's positions option")
            except ValueError as exc:
                raise RunError(str(exc)) from None

    def estimator(self, model: torch.nn.Module) -> LLCEstimator:
        """The estimator at `model`'s weights on the run's training sample (the loss at `positions` only, if set)."""
        if self.sample is None:
            raise RuntimeError("the llc probe measures a run's checkpoints: call bind_run(run_dir) first")
        device = next(model.parameters()).device
        counted = (self.sample.predictions(self.settings.positions, "the llc probe") if self.settings.positions
                   else self.sample.loss_mask)
        rows = {"tokens": self.sample.tokens.to(device), "loss_mask": counted.to(device)}
        estimator = LLCEstimator(model, masked_token_loss, rows, self.settings)
        estimator.uniform_loss = math.log(self._vocab(model))
        if self.settings.seed_per_step:
            estimator.seed = checkpoint_seed(self.settings.seed, estimator.w_star)
        return estimator

    @staticmethod
    def _vocab(model: torch.nn.Module) -> int:
        from phaselens.models.adapter import adapter_for

        return int(adapter_for(model).d_vocab)

    def components(self, model: torch.nn.Module) -> list[Any]:
        """The components the `components` option asks for: None for the whole model, then the adapter's subsets."""
        kinds = self.settings.component_kinds
        chosen: list[Any] = [None] if "model" in kinds else []
        if any(k != "model" for k in kinds):
            from phaselens.models.adapter import adapter_for

            chosen += [c for c in adapter_for(model).component_parameters() if c.kind in kinds]
        return chosen

    def compute(self, inputs: ProbeInputs) -> list[Measurement]:
        on_cpu = next(inputs.model.parameters()).device.type == "cpu"
        components = self.components(inputs.model)
        with torch.inference_mode(False), one_cpu_thread() if on_cpu else nullcontext():  # SGLD needs gradients
            results = self.estimator(inputs.model).estimate_components(components)
        self._last = (id(inputs), results)
        return component_measurements(results, inputs.adapter.n_layers, inputs.adapter.n_heads,
                                      next(inputs.model.parameters()).device)

    def artifact(self, inputs: ProbeInputs) -> dict[str, Any] | None:
        if self._last is None or self._last[0] != id(inputs):
            return None
        results = self._last[1]
        whole = next((r for r in results if r.kind == "model"), results[0])
        out = whole.artifact()
        if len(results) > 1 or whole.kind != "model":
            out["components"] = [r.artifact() for r in results if r is not whole or whole.kind != "model"]
        if self.settings.positions:
            out["positions"] = self.settings.positions
        return out


def checkpoint_seed(seed: int, w_star: torch.Tensor) -> int:
    """A chain seed of its own for one checkpoint: `seed` mixed with a hash of the checkpoint's weights (seed_per_step)."""
    import hashlib

    digest = hashlib.sha256(w_star.detach().float().cpu().numpy().tobytes()).digest()
    return int(np.random.SeedSequence([seed, int.from_bytes(digest[:8], "little")]).generate_state(1, dtype=np.uint64)[0] >> 1)


def component_measurements(results: Sequence[LLCResult], n_layers: int, n_heads: int, device: Any) -> list[Measurement]:
    """Rows of the llc probe: `llc`, `llc_se`, `llc_std` of the model; per head (L, H) `llc`, `llc_se`; per layer (L,)
    `llc_mlp`, `llc_mlp_se`, `llc_layer`, `llc_layer_se` (NaN where a layer has no such part); `llc_embed`, `llc_unembed`
    and their `_se`."""
    out = []
    for r in results:
        if r.kind == "model":
            out += [Measurement("llc", torch.tensor(r.llc, device=device)),
                    Measurement("llc_se", torch.tensor(r.llc_se, device=device)),
                    Measurement("llc_std", torch.tensor(r.llc_std, device=device))]
        elif r.kind == "embeddings":
            out += [Measurement(f"llc_{r.component}", torch.tensor(r.llc, device=device)),
                    Measurement(f"llc_{r.component}_se", torch.tensor(r.llc_se, device=device))]
    for kind, metric in COMPONENT_METRICS.items():
        picked = [r for r in results if r.kind == kind]
        if not picked:
            continue
        layers = max(r.layer for r in picked) + 1  # BDH's heads, shared by every pass, sit at layer 0 alone
        shape = (layers, n_heads) if kind == "heads" else (layers,)
        value, se = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
        for r in picked:
            at = (r.layer, r.head) if kind == "heads" else (r.layer,)
            value[at], se[at] = r.llc, r.llc_se
        out += [Measurement(metric, value.to(device)), Measurement(f"{metric}_se", se.to(device))]
    return out
