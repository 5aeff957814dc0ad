"""The dashboard's JSON API: request and response bodies, the contract the page and the tests share.

Tokens travel as lists of ids with their labels (decoded by the model's tokenizer); what the user
types is turned into ids by `session.tokenize`: token ids separated by spaces, or text through the
model's own tokenizer. Nothing here assumes a vocabulary size.
A model is named by a run and a checkpoint step; `step=None` means the model the server was
given in-process (`pl.serve(model=...)`), or the run's last checkpoint when there is none.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT_CHARS = 4000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------- runs and metrics


class RunSummary(BaseModel):
    name: str
    status: str
    last_step: Optional[int] = None
    checkpoints: list[int] = []
    kernel_model: bool = False  # a model handed over in-process is attached to this entry
    config: dict[str, object] = {}  # a few key settings: layers, heads, d_model, task, lr, steps
    error: Optional[str] = None  # why the run cannot be read (status "unreadable"); the others are served


class RunList(BaseModel):
    runs: list[RunSummary]


class SeriesKey(BaseModel):
    probe: str
    metric: str
    per: Literal["model", "layer", "head"]
    rows: int


class SeriesList(BaseModel):
    run: str
    series: list[SeriesKey]


# `?prefer=` of the metrics route: one curve per series from the preferred source (`phaselens.signals.sources`);
# left out, every row of both sources comes back, each labelled by `source`.
Prefer = Literal["live", "checkpoint", "densest"]


class MetricRows(BaseModel):
    """Metric rows as columns (compact to send, direct to plot)."""

    run: str
    prefer: Optional[Prefer] = None  # the rule the rows were chosen by (None: all rows)
    step: list[int]
    probe: list[str]
    metric: list[str]
    layer: list[Optional[int]]
    head: list[Optional[int]]
    value: list[Optional[float]]
    source: list[str]


class TransitionRow(BaseModel):
    probe: str
    metric: str
    layer: Optional[int]
    head: Optional[int]
    step: int
    start: int
    end: int
    before: float
    after: float
    strength: float
    source: Literal["live", "checkpoint"]  # the curve the transition was found on


class TransitionList(BaseModel):
    run: str
    transitions: list[TransitionRow]


class StageRow(BaseModel):
    """A developmental stage: between critical points of the LLC (and loss) curve; see analysis/stages.py."""

    index: int
    start: int
    end: int
    llc_start: float
    llc_end: float
    transitions: list[str]  # the mechanistic transitions inside it, strongest first


class StageList(BaseModel):
    run: str
    stages: list[StageRow]  # empty until the `llc` probe has measured the run


class EssentialDynamics(BaseModel):
    """The PCA trajectory of the outputs across checkpoints (`analysis.essential_dynamics`), one entry per checkpoint."""

    run: str
    available: bool  # False before the `essential_dynamics` probe has measured three checkpoints
    stored: bool = False  # the stored PCA (else computed for this answer from the stored vectors)
    steps: list[int] = []
    pc1: list[float] = []
    pc2: list[float] = []
    pc3: list[float] = []
    turning: list[Optional[float]] = []  # degrees; null at the ends
    threshold: list[Optional[float]] = []  # the random-walk null's quantile at each checkpoint
    turning_points: list[int] = []  # steps beyond the null
    explained: list[float] = []  # fraction of variance per component
    null_explained: list[float] = []  # 6/(π²k²)
    matched_null_explained: list[float] = []  # walks with this trajectory's step lengths


# ---------------------------------------------------------------------------- the model view


class ModelRef(Strict):
    run: str
    step: Optional[int] = None


class TextRequest(ModelRef):
    text: str = Field("", max_length=MAX_TEXT_CHARS, description="token ids separated by spaces, or text for the model's tokenizer")


class Architecture(BaseModel):
    """What the architecture map draws: embeddings, per layer heads and MLP, unembedding."""

    run: str
    step: Optional[int]
    source: Literal["checkpoint", "kernel"]
    architecture: str  # the model's class: Transformer, GPTNeoXForCausalLM, ...
    n_layers: int
    n_heads: int  # 0 when the model has no softmax attention heads
    n_linear_heads: int = 0  # heads without a softmax pattern (BDH's linear attention): drawn, not inspectable
    n_neurons: int = 0  # sparse neurons per head (BDH), as the adapter says
    shared_weights: bool = False  # every layer is one pass of the same block (BDH)
    has_mlp: bool
    mlp_layers: list[int]
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    tokenizer: Literal["ids", "bytes", "hf"]
    text_hint: str  # what the text box takes


class Sample(BaseModel):
    run: str
    text: str  # decoded text when it tokenises back to `tokens`, else the ids
    tokens: list[int]
    corrupted_text: str  # the same with its first half changed: the patching counterpart
    origin: Literal["induction batch", "probe batch", "drawn"] = "drawn"  # where the sequence comes from
    copy_positions: Optional[list[bool]] = None  # (T-1,) the batch's `copy` predictions, where it names them


class AttentionRequest(TextRequest):
    layer: int = Field(ge=0)
    head: int = Field(ge=0)


class AttentionResponse(BaseModel):
    tokens: list[int]
    labels: list[str]
    pattern: list[list[float]]  # [query][key]


class Node(Strict):
    """A component: a head (`head` set) or a layer's MLP (`head` None)."""

    layer: int = Field(ge=0)
    head: Optional[int] = Field(None, ge=0)


class LossResponse(BaseModel):
    tokens: list[int]
    labels: list[str]
    loss: list[float]  # per prediction position t (predicting token t+1)
    copy_positions: list[bool]  # predictions an induction head can make (the token followed an earlier copy)
    mean_loss: float
    copy_loss: Optional[float]  # None when the text repeats nothing


class AblateRequest(TextRequest):
    nodes: list[Node] = Field(min_length=1, max_length=64)
    mode: Literal["zero", "mean", "freeze"] = "zero"
    reference_text: str = Field("", max_length=MAX_TEXT_CHARS, description="for freeze: the text whose values are held")


class AblateResponse(BaseModel):
    clean: LossResponse
    ablated: LossResponse
    delta: list[float]  # ablated − clean loss per position
    copy_loss_change: Optional[float]


class PatchRequest(ModelRef):
    clean_text: str = Field(max_length=MAX_TEXT_CHARS)
    corrupted_text: str = Field(max_length=MAX_TEXT_CHARS)
    hook: Literal["resid_pre", "attn_out", "mlp_out", "resid_post", "head"] = "resid_pre"
    layer: int = Field(0, ge=0)
    head: Optional[int] = Field(None, ge=0)
    position: Optional[int] = Field(None, ge=0, description="None patches every position")
    answer: Optional[int] = Field(None, ge=0, description="correct token (default: the clean run's top prediction)")
    wrong: Optional[int] = Field(None, ge=0, description="wrong token (default: the corrupted run's top prediction)")


class PatchResponse(BaseModel):
    hook_name: str
    answer: int
    wrong: int
    answer_label: str  # the two tokens as the model's tokenizer shows them
    wrong_label: str
    clean_logit_diff: float
    corrupted_logit_diff: float
    patched_logit_diff: float
    recovered: Optional[float]  # (patched − corrupted) / (clean − corrupted)


class GradientRequest(TextRequest):
    position: Optional[int] = Field(None, ge=0, description="the prediction whose loss is attributed (None: mean loss)")


class GradientResponse(BaseModel):
    tokens: list[int]
    labels: list[str]
    grad_norm: list[float]  # ‖∂loss/∂embedding‖ per token
    loss: float


class WeightsRequest(ModelRef):
    layer: int = Field(ge=0)
    head: int = Field(ge=0)


class WeightsResponse(BaseModel):
    """A head's circuits on token axes: every token (`token`), the top-k tokens (`top_k`), or none with the reason (`hidden`)."""

    space: Literal["token", "top_k", "hidden"]
    note: str  # which tokens the axes hold, or why there are no circuits
    tokens: list[int]  # the ids on both axes
    labels: list[str]
    qk: Optional[list[list[float]]]  # (W_E W_Q)(W_E W_K)ᵀ: query token x key token
    ov: Optional[list[list[float]]]  # W_E W_V W_O W_U: attended token x promoted logit


# ---------------------------------------------------------------------------- neurons


class NeuronLayer(BaseModel):
    name: str  # the hook measured, e.g. blocks.0.mlp.hook_post
    layer: int
    values: dict[str, list[Optional[float]]]  # statistic -> one value per neuron (null: e.g. selectivity of a neuron that never fired)


class NeuronContext(BaseModel):
    before: str  # the text before the activating token
    token: str
    after: str
    value: float  # the activation


class NeuronContexts(BaseModel):
    layer: str  # the hook
    neuron: int
    firing_rate: float
    selectivity: float
    contexts: list[NeuronContext]


class NeuronsResponse(BaseModel):
    available: bool
    files: list[str] = []  # the run's neuron artifacts; the newest readable one is shown
    step: Optional[int] = None  # the checkpoint step the shown artifact measured
    layers: list[NeuronLayer] = []
    neurons: list[NeuronContexts] = []
    problems: list[str] = []  # artifacts that could not be read, and why


# ---------------------------------------------------------------------------- circuits (server/circuits.py)


class CircuitSteps(BaseModel):
    run: str
    steps: list[int]  # checkpoint steps the circuits probe measured (empty before `phaselens probe RUN --probes circuits`)


class CircuitNode(BaseModel):
    name: str  # embed, L1H0, L0M, logits
    kind: Literal["embed", "head", "mlp", "logits"]
    layer: Optional[int]
    head: Optional[int]
    column: int  # where the view draws it, left to right: embed, layer 0 heads, layer 0 MLP (if any), ..., logits


class CircuitEdge(BaseModel):
    edge: str  # L0H1->L1H0.k
    upstream: str
    downstream: str
    input: Literal["q", "k", "v", "mlp", "logits"]
    scores: dict[str, Optional[float]]  # method -> metric(edge patched) − metric(clean), or its estimate
    in_circuit: bool


class CircuitGraph(BaseModel):
    """One checkpoint's circuits artifact (`store.circuit_artifact`) as the view draws it."""

    run: str
    step: int
    methods: list[str]
    circuit_method: str
    threshold: float
    metric_clean: Optional[float]
    metric_corrupt: Optional[float]
    faithfulness: Optional[float]
    pairs: dict[str, object]  # how the clean/corrupt pairs were built: patch, read, corrupt, seed, sequences
    nodes: list[CircuitNode]
    edges: list[CircuitEdge]


class EdgePatchRequest(Strict):
    run: str
    step: int = Field(ge=0, description="a checkpoint step")
    edge: str = Field(min_length=1, max_length=200, description="an edge name, e.g. L0H1->L1H0.k")


class EdgePatchResponse(BaseModel):
    run: str
    step: int
    edge: str
    patch: str  # the token set corrupted
    read: str  # the prediction set whose loss is the metric
    sequences: int
    metric_clean: float
    metric_corrupt: float
    metric_patched: float  # the metric with this one edge patched clean -> corrupt
    change: float  # metric_patched − metric_clean: the edge's exact score, computed now
    stored: dict[str, Optional[float]]  # the scores the probe stored for this edge at this step, by method
    in_circuit: Optional[bool]  # None where the probe did not measure this step
