"""What an induction run found: the copy-loss transition, the heads that formed (ranked by what ablating each
costs the copy loss), which layer settled first (beyond noise)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from phaselens.analysis.components import ablation_steps, ablations_at
from phaselens.signals.levels import final_level, initial_level
from phaselens.signals.transitions import detect_transitions, moving_with, series_label, smooth

COPY_LOSS_SOLVED = 1.0  # copy loss below this after the drop: the model copies
INDUCTION_FORMED = 0.5  # a head's induction score above this afterwards
ROLE_THRESHOLD = INDUCTION_FORMED  # a head holds a role (induction, previous-token) when its score ends above this
SCORE_NAMES = {"induction": "induction score", "prev_token": "previous-token score"}
MOVERS_SHOWN = 5  # series named as moving with each copy-loss transition
SETTLE_BAND = 0.1  # a layer has settled once its coherence stays within 10% of its total move of its final level
NOISE_BANDS = (0.05, 0.2)  # the same rule with a tighter and a looser band: how far the settle step moves is its noise


@dataclass
class StoryEvent:
    """One transition of the headline series (the copy-position loss) and what moved with it."""

    step: int
    start: int
    end: int
    before: float
    after: float
    moved: list[str] = field(default_factory=list)  # "prev_token L0H1 0.08 → 0.63", strongest first

    def text(self) -> str:
        line = f"- step {self.step} (10–90% window {self.start}–{self.end}): copy-position loss {self.before:.2f} → {self.after:.2f}"
        return line + ("; moving with it: " + ", ".join(self.moved) if self.moved else "") + "."


@dataclass(frozen=True)
class Ablation:
    """The headline loss at one checkpoint, clean and with one head mean-ablated (`probes.ablation.ablation_losses`)."""

    step: int
    clean: float
    ablated: float

    @property
    def effect(self) -> float:
        return self.ablated - self.clean


@dataclass
class HeadChange:
    """One head's score before and after the transition, and what mean-ablating it costs the copy loss."""

    layer: int
    head: int
    score: str
    before: float
    after: float
    ablations: list[Ablation] = field(default_factory=list)  # at the final checkpoint, then after the first drop

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass
class HeadRole:
    """The heads that hold one role, most important first: ranked by their ablation effect where measured, else by score.

    `heads` are those whose score ends above `ROLE_THRESHOLD`, or the single best head when none does
    (`passing` False). `not_ablated` says why no ablation was measured (the ranking is then by score).
    """

    name: str  # "Induction", "Previous-token"
    score: str  # the head score of the role: "induction", "prev_token"
    heads: list[HeadChange]
    passing: bool = True
    not_ablated: str | None = None

    def text(self) -> str:
        """"Induction heads: L1H1 (ablating it: copy loss 0.44 → 3.43 at step 3000; score 0.05 → 0.58), L1H0 (...); how
        they were chosen and ranked."""
        score = SCORE_NAMES.get(self.score, self.score)
        which = (f"the {'heads' if len(self.heads) > 1 else 'head'} whose {score} ends above {ROLE_THRESHOLD}" if self.passing
                 else f"the head with the highest {score}; none ends above {ROLE_THRESHOLD}")
        order = ("ranked by the copy-position loss with each head mean-ablated on the probe batch" if self.not_ablated is None
                 else f"ranked by score (not ablated: {self.not_ablated})")
        named = f"{self.name} head{'s' if len(self.heads) > 1 else ''}: "
        return named + ", ".join(self._head_text(h, i == 0) for i, h in enumerate(self.heads)) + f"; {which}, {order}."

    @staticmethod
    def _head_text(head: HeadChange, first: bool) -> str:
        score = f"score {head.before:.2f} → {head.after:.2f}"
        if not head.ablations:
            return f"{head.label} ({score})"
        if first:
            effects = ", ".join(f"{a.clean:.2f} → {a.ablated:.2f} at step {a.step}" for a in head.ablations)
            return f"{head.label} (ablating it: copy loss {effects}; {score})"
        return f"{head.label} ({', '.join(f'→ {a.ablated:.2f}' for a in head.ablations)}; {score})"


@dataclass
class InductionSummary:
    """The findings of an induction run, as numbers and as a sentence or two."""

    vocab: int
    steps: int
    transition: dict | None  # the steepest copy-loss drop: step, start, end, before, after
    copy_loss_final: float
    copy_loss_initial: float
    induction_head: HeadChange | None  # the first of `induction_heads`: the one whose ablation costs most
    prev_token_head: HeadChange | None
    settling: Settling | None = None  # when each layer's attention settled, with the noise of that step
    story: list[StoryEvent] = field(default_factory=list)  # every copy-loss transition, in order
    induction_heads: HeadRole | None = None  # every induction head, most important first
    prev_token_heads: HeadRole | None = None

    @property
    def found(self) -> bool:
        """A copy-loss transition to below 1.0 with an induction head above 0.5 afterwards."""
        return (
            self.transition is not None
            and self.copy_loss_final < COPY_LOSS_SOLVED
            and self.induction_head is not None
            and self.induction_head.after > INDUCTION_FORMED
        )

    def text(self) -> str:
        """What happened, in sentences: the verdict, then every copy-loss transition and what moved with it."""
        verdict = self._verdict()
        if not self.story:
            return verdict
        return verdict + "\nCopy-position loss transitions, in order:\n" + "\n".join(event.text() for event in self.story)

    def _verdict(self) -> str:
        ln_v = math.log(self.vocab)
        if math.isnan(self.copy_loss_final):
            return "No copy-position loss was recorded, so there is nothing to say about induction."
        if not self.found:
            best = f"the best head's induction score is {self.induction_head.after:.2f}" if self.induction_head else "no head scores were recorded"
            chance = f"(chance: ln {self.vocab} = {ln_v:.2f})"
            if self.transition is None:
                return (f"No induction transition in {self.steps} steps: the copy-position loss ends at "
                        f"{self.copy_loss_final:.2f} {chance}, with no sharp drop; {best}.")
            t = self.transition
            if self.copy_loss_final >= COPY_LOSS_SOLVED:
                return (f"Induction has begun but is not complete after {self.steps} steps: the copy-position loss "
                        f"dropped {t['before']:.2f} → {t['after']:.2f} at step {t['step']} {chance} and ends at "
                        f"{self.copy_loss_final:.2f}, above {COPY_LOSS_SOLVED}; {best}.")
            return (f"No induction head: the copy-position loss ends at {self.copy_loss_final:.2f} {chance}, "
                    f"but {best}, below {INDUCTION_FORMED}.")
        t, ih = self.transition, self.induction_head
        lines = [
            f"Induction transition at step {t['step']}: the copy-position loss falls from {self.copy_loss_initial:.2f} "
            f"(chance: ln {self.vocab} = {ln_v:.2f}) to {self.copy_loss_final:.2f}; its steepest drop, "
            f"{t['before']:.2f} → {t['after']:.2f}, spans steps {t['start']}–{t['end']} (10–90%).",
            self.induction_heads.text() if self.induction_heads is not None
            else f"Induction head {ih.label}: induction score {ih.before:.2f} → {ih.after:.2f}.",
        ]
        if self.prev_token_heads is not None:
            lines.append(self.prev_token_heads.text())
        if self.settling is not None:
            lines.append(self.settling.text())
        return "\n".join(lines)


def _level(frame: pd.DataFrame, steps: range | np.ndarray) -> float:
    values = frame[frame["step"].isin(steps)]["value"]
    return float(values.median()) if len(values) else float("nan")


def _head_changes(scores: pd.DataFrame, score: str, window: tuple[int, int], layer: int | None) -> list[HeadChange]:
    """Every head of `layer` (any layer if None): its `score` after the window and its level before, highest after first."""
    sub = scores[scores["metric"] == score]
    if layer is not None:
        sub = sub[sub["layer"] == layer]
    start, end = window
    lead = max(1, end - start)  # stay clear of the rise itself when reading the level before
    changes = []
    for (lay, head), group in sub.groupby(["layer", "head"]):
        group = group.sort_values("step")
        before = _level(group, group["step"][group["step"] <= start - lead].tail(50).to_numpy())
        after = _level(group, group["step"][group["step"] >= end].tail(max(20, len(group) // 10)).to_numpy())
        if math.isnan(before):
            before = float(group["value"].iloc[0])
        if math.isnan(after):
            after = float(group["value"].iloc[-1])
        changes.append(HeadChange(int(lay), int(head), score, before, after))
    return sorted(changes, key=lambda c: -c.after)


def _candidates(changes: list[HeadChange]) -> tuple[list[HeadChange], bool]:
    """The heads that hold a role: those whose score ends above `ROLE_THRESHOLD` (True), else the best one (False)."""
    heads = [c for c in changes if c.after > ROLE_THRESHOLD]
    return (heads, True) if heads else (changes[:1], False)


def _role(name: str, score: str, heads: list[HeadChange], passing: bool, not_ablated: str | None) -> HeadRole | None:
    """The heads holding a role (see `HeadRole`), the one whose ablation costs most at the final checkpoint first (ties
    by score) where their `ablations` were measured, else in score order."""
    if not heads:
        return None
    if not_ablated is None:
        heads = sorted(heads, key=lambda h: (-h.ablations[0].effect, -h.after))
    return HeadRole(name, score, heads, passing, not_ablated)


def _ablate(run, steps: list[int], heads: list[HeadChange]) -> str | None:
    """Fill each head's `ablations` at `steps` (checkpoints) with the copy-position loss on the run's batch holding the
    phenomenon's prediction set (`analysis.components.ablations_at`, each checkpoint loaded once for all the heads),
    or return why it cannot."""
    metric = run.study.phenomenon.metric if run.study.phenomenon else "copy"
    nodes = list(dict.fromkeys((h.layer, h.head) for h in heads))
    found, reason = ablations_at(run, steps, nodes, metric)
    for h in heads:
        h.ablations = [Ablation(a.step, a.clean, a.ablated[(h.layer, h.head)]) for a in found]
    return reason


@dataclass
class Settling:
    """When each layer's attention settled, and how precisely that step is known.

    A layer's settle step is the first step after which its mean coherence stays within 10% of its total move
    of its final level (`settle_steps`). Its noise is how far that step moves with the rule's one free choice,
    the band: the settle step with a 5% band minus the one with a 20% band (a tighter band settles later, so
    the 10% step lies between them). A layer settled before another only when the gap between their 10% steps
    exceeds the sum of their two noises, so an order that some band between 5% and 20% reverses is never
    printed (the gap is then below that sum); otherwise they settled together.
    """

    steps: dict[int, int]  # layer -> settle step with the 10% band
    ranges: dict[int, tuple[int, int]]  # layer -> settle steps with the 20% and the 5% band (earlier, later)

    def noise(self, layer: int) -> int:
        loose, tight = self.ranges[layer]
        return tight - loose

    def pair_noise(self, a: int, b: int) -> int:
        return self.noise(a) + self.noise(b)

    def apart(self, a: int, b: int) -> bool:
        """Whether layers a and b settled further apart than their noise explains."""
        return abs(self.steps[a] - self.steps[b]) > self.pair_noise(a, b)

    @property
    def first(self) -> list[int]:
        """The layers that settled first: the earliest one and every layer within noise of it, earliest first."""
        earliest = min(self.steps, key=self.steps.get)
        return sorted((layer for layer in self.steps if not self.apart(earliest, layer)), key=self.steps.get)

    def text(self) -> str:
        """One sentence: which layer settled first, or that they settled together, with the gap and its noise."""
        by_step = sorted(self.steps, key=self.steps.get)
        stable = ", ".join(f"for layer {layer} from step {self.steps[layer]} ({self.ranges[layer][0]}–{self.ranges[layer][1]})"
                           for layer in by_step)
        rule = "in brackets: the settle step with a 20% and a 5% band instead of 10%; the noise is the sum of the ranges' widths"
        first = self.first
        if len(first) == 1:
            a, b = by_step[0], by_step[1]
            return (f"Layer {a} settled first: attention coherence stable {stable}; the gap of {self.steps[b] - self.steps[a]} "
                    f"steps to layer {b} exceeds its noise of {self.pair_noise(a, b)} steps ({rule}).")
        gap = self.steps[first[-1]] - self.steps[first[0]]
        noise = max(self.pair_noise(first[0], layer) for layer in first[1:])
        who = "The layers" if len(first) == len(self.steps) else "Layers " + " and ".join(str(layer) for layer in first)
        return (f"{who} settled together (within {gap} steps, inside the noise of {noise} steps): attention coherence "
                f"stable {stable} ({rule}).")


def settling(attention: pd.DataFrame) -> Settling | None:
    """Each layer's settle step and its range over the bands (see `Settling`); None with fewer than two layers."""
    steps = settle_steps(attention)
    if len(steps) < 2:
        return None
    tight, loose = (settle_steps(attention, band) for band in NOISE_BANDS)
    return Settling(steps, {layer: (loose[layer], tight[layer]) for layer in steps})


def settle_steps(attention: pd.DataFrame, band: float = SETTLE_BAND) -> dict[int, int]:
    """Per layer, the first step after which its mean coherence stays within `band` of its total move of its final level."""
    out = {}
    coherence = attention[(attention["metric"] == "coherence") & attention["head"].notna()]
    for layer, group in coherence.groupby("layer"):
        series = group.groupby("step")["value"].mean().sort_index()
        if len(series) < 12:
            continue
        values = smooth(series.to_numpy(), max(3, (len(series) // 40) | 1))
        final, total = values[-1], np.max(np.abs(values - values[-1]))
        if total <= 1e-9:
            out[int(layer)] = int(series.index[0])
            continue
        outside = np.nonzero(np.abs(values - final) > band * total)[0]
        idx = int(outside[-1]) + 1 if len(outside) else 0
        out[int(layer)] = int(series.index[min(idx, len(series) - 1)])
    return out


def summarize_induction(run, ablate: bool = True) -> InductionSummary:
    """Read an induction run's live metrics and say what formed, when; where induction formed, rank the heads by
    mean-ablating each at the final checkpoint and after the first drop (a few forward passes; `ablate=False`
    ranks them by score)."""
    metrics = run.metrics(source="live")
    losses = metrics[metrics["probe"] == "loss"]
    copy = losses[losses["metric"] == "copy"].sort_values("step")
    vocab = int(run.config["model"]["d_vocab"])
    steps = int(metrics["step"].max()) if len(metrics) else 0
    transitions = detect_transitions(copy)
    headline = run.headline_transitions()  # the study's phenomenon: each copy-loss drop of at least 0.5 nats
    transition = None
    if len(headline):
        best = headline.loc[(headline["before"] - headline["after"]).idxmax()]  # the steepest of them
        transition = {k: (int(best[k]) if k in ("step", "start", "end") else float(best[k])) for k in ("step", "start", "end", "before", "after")}
    final, initial = final_level(copy["value"]), initial_level(copy["value"])
    heads = metrics[metrics["probe"] == "heads"]
    n_layers = int(run.config["model"]["n_layers"])
    window = (transition["start"], transition["end"]) if transition else (0, steps)
    induction = _head_changes(heads, "induction", window, None)
    prev = _head_changes(heads, "prev_token", window, 0 if n_layers > 1 else None)
    attention = metrics[metrics["probe"] == "attention"]
    story = _story(transitions, metrics) if len(transitions) else []
    summary = InductionSummary(vocab, steps, transition, final, initial, induction[0] if induction else None,
                               prev[0] if prev else None, settling(attention), story)
    if summary.found:
        (induction_heads, induction_pass), (prev_heads, prev_pass) = _candidates(induction), _candidates(prev)
        if ablate:
            steps_at = ablation_steps(run.checkpoint_steps(), int(headline.iloc[0]["end"]))  # headline: earliest first
            not_ablated = _ablate(run, steps_at, induction_heads + prev_heads)
        else:
            not_ablated = "ranking by score was asked for"
        summary.induction_heads = _role("Induction", "induction", induction_heads, induction_pass, not_ablated)
        summary.prev_token_heads = _role("Previous-token", "prev_token", prev_heads, prev_pass, not_ablated)
        summary.induction_head = summary.induction_heads.heads[0]
        summary.prev_token_head = summary.prev_token_heads.heads[0] if summary.prev_token_heads else None
    return summary


def _value(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.2g}"


def _story(copy_transitions: pd.DataFrame, metrics: pd.DataFrame) -> list[StoryEvent]:
    """Every copy-loss transition, earliest first, with the strongest transitions of other series inside its window."""
    shown = metrics[~((metrics["probe"] == "loss") & (metrics["metric"] == "copy")) & (metrics["metric"] != "head_variance")]
    others = detect_transitions(shown)
    events = []
    for t in copy_transitions.sort_values("step").itertuples(index=False):
        movers = moving_with(others, int(t.start), int(t.end))
        movers = pd.concat([movers[movers["probe"] == "heads"], movers[movers["probe"] != "heads"]]).head(MOVERS_SHOWN)
        moved = [f"{series_label(m)}{' loss' if m['probe'] == 'loss' else ''} {_value(m['before'])} → {_value(m['after'])}"
                 for _, m in movers.iterrows()]
        events.append(StoryEvent(int(t.step), int(t.start), int(t.end), float(t.before), float(t.after), moved))
    return events
