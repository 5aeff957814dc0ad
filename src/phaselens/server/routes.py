"""The API routes: runs and their metrics (read through `phaselens.run`), and the model view."""

from __future__ import annotations

import math
from typing import Optional

from fastapi import APIRouter

from phaselens.errors import PhaselensError
from phaselens.probes import ablation
from phaselens.server import interventions as iv
from phaselens.server import schemas as s
from phaselens.server.session import (KERNEL, BadInput, Session, as_text, corrupt_first_half, induction_sample, neuron_view,
                                      run_signature, text_hint, token_labels, tokenize)

KEY_CONFIG = {"model": ("n_layers", "n_heads", "d_model", "d_mlp"), "train": ("steps", "lr", "batch_size", "seed")}  # beside model.kind, data.task
MAX_METRIC_ROWS = 2_000_000


def finite(value: float | None) -> float | None:
    """JSON has no NaN: a NaN or infinite value travels as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def runs_signature(session: Session) -> tuple:
    """Changes whenever a served run writes: run.json, checkpoints, metrics (WAL included)."""
    return tuple((name, run_signature(path)) for name, path in session.runs.items())


# ---------------------------------------------------------------------------- runs


def run_summary(session: Session, name: str) -> s.RunSummary:
    """Status, last step, checkpoints and key settings of one served run (PhaselensError if it is unreadable)."""
    run = session.run(name)
    config = run.config
    key = {"model.kind": run.spec.kind, "data.task": run.task}
    key.update({f"{section}.{k}": config.get(section, {}).get(k) for section, keys in KEY_CONFIG.items() for k in keys
                if k in (config.get(section) or {})})
    checkpoints = run.checkpoint_steps()
    trained = run.metrics(probe="loss", metric="train")["step"]
    known = [int(trained.max())] if len(trained) else []
    last = max(known + checkpoints[-1:]) if known or checkpoints else None
    return s.RunSummary(name=name, status=run.status, last_step=last, checkpoints=checkpoints,
                        kernel_model=session.model_run == name, config=key)



def runs_router(session: Session) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/runs", response_model=s.RunList)
    def list_runs():
        runs = []
        for name in session.runs:
            try:
                runs.append(run_summary(session, name))
            except PhaselensError as exc:  # one broken run is listed with its reason; the others are served
                runs.append(s.RunSummary(name=name, status="unreadable", error=session.redact(str(exc)),
                                         kernel_model=session.model_run == name))
        if session.model_run == KERNEL:
            model = session.model
            runs.append(s.RunSummary(name=KERNEL, status="in-process", kernel_model=True,
                                     config={"model.kind": model.architecture, "model.n_layers": model.n_layers, "model.n_heads": model.n_heads}))
        return s.RunList(runs=runs)

    @router.get("/runs/{run}/series", response_model=s.SeriesList)
    def series(run: str):
        return s.SeriesList(run=run, series=series_keys(session, run))

    @router.get("/runs/{run}/metrics", response_model=s.MetricRows)
    def metrics(run: str, probe: Optional[str] = None, metric: Optional[str] = None, source: Optional[str] = None,
                layer: Optional[int] = None, head: Optional[int] = None, prefer: Optional[s.Prefer] = None):
        """The run's metric rows; `prefer` picks one source per series by `Run.metrics`' rule (the page asks "densest")."""
        frame = _metrics(session, run, probe=probe, metric=metric, source=source, layer=layer, head=head, prefer=prefer)
        if len(frame) > MAX_METRIC_ROWS:
            raise BadInput(f"{len(frame)} rows: narrow the request with probe= and metric=")

        def ints(column):
            return [_optional_int(v) for v in frame[column].astype(object)]

        return s.MetricRows(run=run, prefer=prefer, step=frame["step"].astype(int).tolist(), probe=frame["probe"].tolist(),
                            metric=frame["metric"].tolist(), layer=ints("layer"), head=ints("head"),
                            value=[finite(v) for v in frame["value"].tolist()], source=frame["source"].tolist())

    @router.get("/runs/{run}/transitions", response_model=s.TransitionList)
    def transitions(run: str):
        frame = run_transitions(session, run)
        rows = [s.TransitionRow(probe=r.probe, metric=r.metric, layer=_optional_int(r.layer), head=_optional_int(r.head),
                                step=int(r.step), start=int(r.start), end=int(r.end), before=finite(r.before) or 0.0,
                                after=finite(r.after) or 0.0, strength=finite(r.strength) or 0.0, source=r.source)
                for r in frame.astype(object).itertuples(index=False)]
        return s.TransitionList(run=run, transitions=rows)

    @router.get("/runs/{run}/stages", response_model=s.StageList)
    def stages(run: str):
        return s.StageList(run=run, stages=stage_rows(session, run))

    @router.get("/runs/{run}/sample", response_model=s.Sample)
    def sample(run: str, step: Optional[int] = None):
        """A default text: the first sequence of the run's induction batch where it has one (text runs, late
        disambiguation, imported series), else of its probe batch; as text where the model has a tokenizer.

        Without either (a model from the notebook), a repeated segment of random tokens. `copy_positions` are the
        batch's own `copy` predictions where it names them. The corrupted prompt for patching is the same with
        its first half changed.
        """
        batches = {}
        if session.has_run(run):
            try:
                batches = session.run(run).probe_batches()
            except OSError:
                pass  # an older import without a probe batch: draw one below
        with session.lock:
            try:
                model, _ = session.model_for(run, step)
            except PhaselensError:
                if not batches:
                    raise
                model = None  # no checkpoint yet: the ids serve as they are
            # The induction batch is there to show an induction head's stripe; a model without softmax heads
            # (BDH) has no stripe to show and opens on its probe batch, the run's own text.
            order = ("induction", "probe") if model is None or model.has_attention else ("probe", "induction")
            name = next((n for n in order if n in batches), None)
            tokens, copies, origin = None, None, "drawn"
            if name is not None:
                batch, origin = batches[name], f"{name} batch"
                tokens = batch.tokens[0].tolist()
                copies = batch.positions["copy"][0].tolist() if "copy" in batch.positions else None  # (T-1,) predictions
            else:
                tokens = induction_sample(model)
            tokens = tokens[: model.n_ctx] if model is not None else tokens
            copies = copies[: len(tokens) - 1] if copies is not None else None
            corrupted = corrupt_first_half(tokens)
            if model is None:
                return s.Sample(run=run, text=" ".join(map(str, tokens)), tokens=tokens, corrupted_text=" ".join(map(str, corrupted)),
                                origin=origin, copy_positions=copies)
            return s.Sample(run=run, text=as_text(tokens, model), tokens=tokens, corrupted_text=as_text(corrupted, model),
                            origin=origin, copy_positions=copies)

    @router.get("/runs/{run}/neurons", response_model=s.NeuronsResponse)
    def neurons(run: str):
        if run != KERNEL:
            session.run(run)  # 404 for a run not served
        files = session.neuron_files(run)
        if not files:
            return s.NeuronsResponse(available=False)
        root = session.runs[run].resolve()
        return s.NeuronsResponse(files=[str(f.relative_to(root)) for f in files], **neuron_view(files, root))

    @router.get("/runs/{run}/essential", response_model=s.EssentialDynamics)
    def essential(run: str):
        from phaselens.analysis.essential_dynamics import current_trajectory

        if run == KERNEL and session.model_run == KERNEL:
            return s.EssentialDynamics(run=run, available=False)
        trajectory, stored = current_trajectory(session.run(run))
        if trajectory is None:
            return s.EssentialDynamics(run=run, available=False)
        coords = list(zip(*trajectory.coords))
        return s.EssentialDynamics(run=run, available=True, stored=stored, steps=trajectory.steps, pc1=list(coords[0]),
                                   pc2=list(coords[1]), pc3=list(coords[2]), turning=trajectory.turning,
                                   threshold=trajectory.threshold, turning_points=trajectory.turning_points,
                                   explained=trajectory.explained, null_explained=trajectory.null_explained,
                                   matched_null_explained=trajectory.matched_null_explained)

    return router


def _optional_int(value) -> int | None:
    import pandas as pd

    return None if pd.isna(value) else int(value)


def _metrics(session: Session, run: str, **filters):
    for key in ("layer", "head"):
        value = filters.get(key)
        if value is not None and not -2**63 <= value < 2**63:
            raise BadInput(f"{key}={value} is out of range")
    if run == KERNEL and session.model_run == KERNEL:
        import pandas as pd

        from phaselens.store.metrics import COLUMNS

        return pd.DataFrame(columns=COLUMNS)
    return session.run(run).metrics(**filters)


# ---------------------------------------------------------------------------- whole-run views, computed once per change


def series_keys(session: Session, run: str) -> list[s.SeriesKey]:
    """Every (probe, metric) of the run, with what it is measured per and its row count."""
    def compute():
        out = []
        for (probe, metric), group in _metrics(session, run).groupby(["probe", "metric"], sort=True):
            per_head = group["head"].notna().any()
            per_layer = group["layer"].notna().any()
            out.append(s.SeriesKey(probe=probe, metric=metric, per="head" if per_head else "layer" if per_layer else "model",
                                   rows=len(group)))
        return out

    return _derived(session, run, "series", compute)


def run_transitions(session: Session, run: str):
    return _derived(session, run, "transitions", lambda: _transitions(session, run))


def stage_rows(session: Session, run: str) -> list[s.StageRow]:
    """The run's developmental stages (`analysis.stages.run_stages`); none before the llc probe ran."""
    import pandas as pd

    from phaselens.analysis.stages import run_stages

    def compute():
        llc = _metrics(session, run, probe="llc")  # without llc rows there are no stages: the rest is not read
        if not len(llc):
            return []
        found, _ = run_stages(pd.concat([llc, _metrics(session, run, probe="loss")], ignore_index=True), run_transitions(session, run))
        return [s.StageRow(index=st.index, start=st.start, end=st.end, llc_start=finite(st.llc[0]) or 0.0,
                           llc_end=finite(st.llc[1]) or 0.0, transitions=st.transitions) for st in found]

    return _derived(session, run, "stages", compute)


def prewarm(session: Session) -> None:
    """Compute every served run's whole-run views ahead of the first page load (the server runs it in a thread at start)."""
    for name in list(session.runs):
        for view in (series_keys, run_transitions, stage_rows):
            try:
                view(session, name)
            except Exception:  # noqa: BLE001 - an unreadable run is reported when the page asks for it
                break


def _derived(session: Session, run: str, what: str, compute):
    """A whole-run view computed once per change of the run (`Session.derived`); the notebook's model has no run files."""
    if run == KERNEL and session.model_run == KERNEL:
        return compute()
    return session.derived(run, what, compute)


def _transitions(session: Session, run: str):
    """The run's detected transitions as `Run.transitions()` defines them (revisions with repeated weights left out)."""
    if run == KERNEL and session.model_run == KERNEL:
        from phaselens.signals.transitions import detect_transitions

        return detect_transitions(_metrics(session, run))
    return session.run(run).transitions()


# ---------------------------------------------------------------------------- model view


def model_router(session: Session) -> APIRouter:
    router = APIRouter(prefix="/api/model")

    def prepare(request: s.TextRequest):
        model, source = session.model_for(request.run, request.step)
        return model, source, token_tensor(request.text, model)

    def token_tensor(text: str, model):
        import torch

        return torch.tensor(tokenize(text, model), device=model.device)

    def check_node(model, layer: int, head: int | None, mlp: bool = True) -> None:
        """Refuse a layer or head the model does not have; `head=None` means the MLP when `mlp`."""
        if layer >= model.n_layers:
            raise BadInput(f"layer {layer} does not exist: the model has {model.n_layers} layers (0–{model.n_layers - 1})")
        if head is not None and not model.has_attention:
            raise BadInput(f"{model.architecture} has no softmax attention heads to look at, ablate or patch")
        if head is not None and head >= model.n_heads:
            raise BadInput(f"head {head} does not exist: layers have {model.n_heads} heads (0–{model.n_heads - 1})")
        if mlp and head is None and not model.has_mlp(layer):
            raise BadInput(f"layer {layer} has no MLP" + ("" if model.mlp_layers else " (the model is attention-only)"))

    def loss_response(logits, tokens, model) -> s.LossResponse:
        view = iv.loss_view(logits, tokens)
        ids = tokens.tolist()
        return s.LossResponse(tokens=ids, labels=token_labels(ids, model), loss=[finite(v) or 0.0 for v in view["loss"]],
                              copy_positions=view["copy_positions"], mean_loss=finite(view["mean_loss"]) or 0.0,
                              copy_loss=finite(view["copy_loss"]))

    @router.post("/architecture", response_model=s.Architecture)
    def architecture(request: s.ModelRef):
        with session.lock:
            model, source = session.model_for(request.run, request.step)
            return s.Architecture(run=request.run, step=request.step, source=source, architecture=model.architecture,
                                  n_layers=model.n_layers, n_heads=model.n_heads if model.has_attention else 0,
                                  n_linear_heads=0 if model.has_attention else model.n_heads, n_neurons=model.n_neurons,
                                  shared_weights=model.shared_layers,
                                  has_mlp=bool(model.mlp_layers), mlp_layers=list(model.mlp_layers), d_model=model.d_model,
                                  d_head=model.d_head, d_vocab=model.d_vocab, n_ctx=model.n_ctx,
                                  tokenizer=model.tokenizer.kind, text_hint=text_hint(model))

    @router.post("/loss", response_model=s.LossResponse)
    def loss(request: s.TextRequest):
        import torch

        with session.lock:
            model, _, tokens = prepare(request)
            with torch.no_grad():
                logits = model.logits(tokens[None])
            return loss_response(logits, tokens, model)

    @router.post("/attention", response_model=s.AttentionResponse)
    def attention(request: s.AttentionRequest):
        with session.lock:
            model, _, tokens = prepare(request)
            check_node(model, request.layer, request.head)
            pattern = iv.attention_pattern(model, tokens, request.layer, request.head)  # (T, T)
            ids = tokens.tolist()
            labels = token_labels(ids, model)
        return s.AttentionResponse(tokens=ids, labels=labels,
                                   pattern=(pattern.float() * 1e4).round().div(1e4).tolist())

    @router.post("/ablate", response_model=s.AblateResponse)
    def ablate(request: s.AblateRequest):
        import torch

        with session.lock:
            model, source, tokens = prepare(request)
            nodes = [(n.layer, n.head) for n in request.nodes]
            for layer, head in nodes:
                check_node(model, layer, head)
            if request.mode == "zero":
                replacements = None
            elif request.mode == "mean":
                replacements = session.mean_values(request.run, request.step, source, model, nodes, tokens)
            else:
                if not request.reference_text.strip():
                    raise BadInput("freeze needs a reference_text: the text whose values the nodes are held at")
                ref = token_tensor(request.reference_text, model)
                if len(ref) < len(tokens):
                    raise BadInput(f"the reference text has {len(ref)} tokens and the text {len(tokens)}: "
                                   "freezing holds each position at the reference's value, so it needs at least as many")
                replacements = ablation.node_values(model, ref[None], nodes)
            with torch.no_grad():
                clean = model.logits(tokens[None])
            ablated = ablation.ablated_logits(model, tokens, ablation.ablation_hooks(model, nodes, replacements))
            before, after = loss_response(clean, tokens, model), loss_response(ablated, tokens, model)
        change = None if before.copy_loss is None or after.copy_loss is None else after.copy_loss - before.copy_loss
        return s.AblateResponse(clean=before, ablated=after, delta=[a - b for a, b in zip(after.loss, before.loss)],
                                copy_loss_change=change)

    @router.post("/patch", response_model=s.PatchResponse)
    def patch(request: s.PatchRequest):
        with session.lock:
            model, _ = session.model_for(request.run, request.step)
            clean, corrupted = token_tensor(request.clean_text, model), token_tensor(request.corrupted_text, model)
            if len(clean) != len(corrupted):
                raise BadInput(f"the two prompts must have the same number of tokens ({len(clean)} and {len(corrupted)})")
            head = request.head if request.hook == "head" else None
            if request.hook == "head" and head is None:
                raise BadInput("hook 'head' needs a head index")
            check_node(model, request.layer, head, mlp=request.hook == "mlp_out")
            if request.position is not None and request.position >= len(clean):
                raise BadInput(f"position {request.position} is past the end of the prompts ({len(clean)} tokens)")
            for name, token in (("answer", request.answer), ("wrong", request.wrong)):
                if token is not None and token >= model.d_vocab:
                    raise BadInput(f"{name} token {token} is outside the vocabulary (ids 0–{model.d_vocab - 1})")
            if request.answer is not None and request.answer == request.wrong:
                raise BadInput(f"answer and wrong are both token {request.answer}: their logit difference is always 0")
            hook_name = patch_hook(model, request.hook, request.layer)
            result = iv.patch_logit_diff(model, clean, corrupted, hook_name, head, request.position, request.answer, request.wrong)
            answer_label, wrong_label = token_labels([result["answer"], result["wrong"]], model)
        return s.PatchResponse(**result, answer_label=answer_label, wrong_label=wrong_label)

    @router.post("/gradients", response_model=s.GradientResponse)
    def gradients(request: s.GradientRequest):
        with session.lock:
            model, _, tokens = prepare(request)
            if request.position is not None and request.position >= len(tokens) - 1:
                raise BadInput(f"position {request.position}: the text has {len(tokens) - 1} predictions (0–{len(tokens) - 2})")
            norms, loss = iv.embedding_gradients(model, tokens, request.position)
            ids = tokens.tolist()
            labels = token_labels(ids, model)
        return s.GradientResponse(tokens=ids, labels=labels, grad_norm=norms.tolist(), loss=loss)

    @router.post("/weights", response_model=s.WeightsResponse)
    def weights(request: s.WeightsRequest):
        with session.lock:
            model, source = session.model_for(request.run, request.step)
            check_node(model, request.layer, request.head)
            found = iv.circuit_matrices(model, request.layer, request.head, session.head_weights(model, source))
            labels = token_labels(found["ids"], model)

        return s.WeightsResponse(space=found["space"], note=found["note"], tokens=found["ids"], labels=labels,
                                 qk=significant(found["qk"]), ov=significant(found["ov"]))

    return router


def significant(matrix, digits: int = 4):
    """A matrix as nested lists, rounded to `digits` significant digits of its largest entry (small weights keep their detail)."""
    if matrix is None:
        return None
    matrix = matrix.float()
    top = float(matrix.abs().max())
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(top))) if top > 0 and math.isfinite(top) else 1.0
    return (matrix * scale).round().div(scale).tolist()


def patch_hook(model, hook: str, layer: int) -> str:
    """The hook point a patch request names: residual streams from the adapter's sites, heads and MLPs from its hooks."""
    sites = model.residual_sites  # stream ℓ enters block ℓ; stream ℓ + 1 leaves it
    name = {"head": lambda: model.z_hook(layer), "mlp_out": lambda: model.mlp_out_hook(layer),
            "resid_pre": lambda: sites[layer].hook, "resid_post": lambda: sites[layer + 1].hook,
            "attn_out": lambda: f"blocks.{layer}.hook_attn_out"}[hook]()
    if name not in model.hook_points:
        raise BadInput(f"{model.architecture} has no hook point {name!r} to patch")
    return name

