"""The API routes: runs and their metrics (read through `phaselens.run`), and the model view."""

from __future__ import annotations

import math
from typing import Optional

from fastapi import APIRouter

from phaselens.server import interventions as iv
from phaselens.server import schemas as s
from phaselens.server.session import KERNEL, BadInput, Session, read_neuron_reports, token_labels, tokenize

KEY_CONFIG = {"model": ("kind", "n_layers", "n_heads", "d_model", "d_mlp"), "data": ("task",), "train": ("steps", "lr", "batch_size", "seed")}
MAX_METRIC_ROWS = 2_000_000


def finite(value: float | None) -> float | None:
    """JSON has no NaN: a NaN or infinite value travels as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def runs_signature(session: Session) -> tuple:
    """Changes whenever a served run writes: run.json, checkpoints, metrics (WAL included)."""
    parts = []
    for name, path in session.runs.items():
        for file in (path / "run.json", path / "metrics.sqlite", path / "metrics.sqlite-wal", path / "checkpoints"):
            try:
                stat = file.stat()
                parts.append((name, file.name, stat.st_mtime_ns, stat.st_size))
            except OSError:
                parts.append((name, file.name, None, None))
    return tuple(parts)


# ---------------------------------------------------------------------------- runs


def runs_router(session: Session) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/runs", response_model=s.RunList)
    def list_runs():
        runs = []
        for name in session.runs:
            run = session.run(name)
            config = run.config
            key = {f"{section}.{k}": config.get(section, {}).get(k) for section, keys in KEY_CONFIG.items() for k in keys
                   if k in (config.get(section) or {})}
            checkpoints = run.checkpoint_steps()
            trained = run.metrics(probe="loss", metric="train")["step"]
            known = [int(trained.max())] if len(trained) else []
            last = max(known + checkpoints[-1:]) if known or checkpoints else None
            runs.append(s.RunSummary(name=name, status=run.status, last_step=last, checkpoints=checkpoints,
                                     kernel_model=session.model_run == name, config=key))
        if session.model_run == KERNEL:
            model = session.model
            runs.append(s.RunSummary(name=KERNEL, status="in-process", kernel_model=True,
                                     config={"model.n_layers": model.cfg.n_layers, "model.n_heads": model.cfg.n_heads}))
        return s.RunList(runs=runs)

    @router.get("/runs/{run}/series", response_model=s.SeriesList)
    def series(run: str):
        frame = _metrics(session, run)
        out = []
        for (probe, metric), group in frame.groupby(["probe", "metric"], sort=True):
            per_head = group["head"].notna().any()
            per_layer = group["layer"].notna().any()
            out.append(s.SeriesKey(probe=probe, metric=metric, per="head" if per_head else "layer" if per_layer else "model", rows=len(group)))
        return s.SeriesList(run=run, series=out)

    @router.get("/runs/{run}/metrics", response_model=s.MetricRows)
    def metrics(run: str, probe: Optional[str] = None, metric: Optional[str] = None, source: Optional[str] = None,
                layer: Optional[int] = None, head: Optional[int] = None):
        frame = _metrics(session, run, probe=probe, metric=metric, source=source, layer=layer, head=head)
        if len(frame) > MAX_METRIC_ROWS:
            raise BadInput(f"{len(frame)} rows: narrow the request with probe= and metric=")

        def ints(column):
            return [_optional_int(v) for v in frame[column].astype(object)]

        return s.MetricRows(run=run, step=frame["step"].astype(int).tolist(), probe=frame["probe"].tolist(),
                            metric=frame["metric"].tolist(), layer=ints("layer"), head=ints("head"),
                            value=[finite(v) for v in frame["value"].tolist()], source=frame["source"].tolist())

    @router.get("/runs/{run}/transitions", response_model=s.TransitionList)
    def transitions(run: str):
        frame = _metrics(session, run)
        from phaselens.analysis.transitions import detect_transitions

        frame = detect_transitions(frame)
        rows = [s.TransitionRow(probe=r.probe, metric=r.metric, layer=_optional_int(r.layer), head=_optional_int(r.head),
                                step=int(r.step), start=int(r.start), end=int(r.end), before=finite(r.before) or 0.0,
                                after=finite(r.after) or 0.0, strength=finite(r.strength) or 0.0)
                for r in frame.astype(object).itertuples(index=False)]
        return s.TransitionList(run=run, transitions=rows)

    @router.get("/runs/{run}/sample", response_model=s.Sample)
    def sample(run: str):
        """A default text: the first sequence of the run's probe batch (an induction sequence for the demo)."""
        tokens = None
        if session.has_run(run):
            try:
                tokens = session.run(run).probe_batch().tokens[0].tolist()
            except OSError:
                pass  # no probe batch (an imported series): draw one below
        if tokens is None:
            import torch

            from phaselens.tasks.induction import InductionTask

            cfg = session.model.cfg if run == session.model_run else session.run(run).run_config().model
            task = InductionTask(seq_len=cfg.n_ctx, vocab=cfg.d_vocab, max_len=min(24, cfg.n_ctx // 2))
            tokens = task.sample(1, torch.Generator().manual_seed(0)).tokens[0].tolist()
        return s.Sample(run=run, text=" ".join(map(str, tokens)), tokens=tokens)

    @router.get("/runs/{run}/neurons", response_model=s.NeuronsResponse)
    def neurons(run: str):
        if run != KERNEL:
            session.run(run)  # 404 for a run not served
        files = session.neuron_files(run)
        if not files:
            return s.NeuronsResponse(available=False)
        root = session.runs[run].resolve()
        found = read_neuron_reports(files, root)
        return s.NeuronsResponse(available=bool(found["layers"] or found["neurons"]),
                                 files=[str(f.relative_to(root)) for f in files], **found)

    return router


def _optional_int(value) -> int | None:
    import pandas as pd

    return None if pd.isna(value) else int(value)


def _metrics(session: Session, run: str, **filters):
    if run == KERNEL and session.model_run == KERNEL:
        import pandas as pd

        from phaselens.store.metrics import COLUMNS

        return pd.DataFrame(columns=COLUMNS)
    return session.run(run).metrics(**filters)


# ---------------------------------------------------------------------------- model view


def model_router(session: Session) -> APIRouter:
    router = APIRouter(prefix="/api/model")

    def prepare(request: s.TextRequest):
        model, source = session.model_for(request.run, request.step)
        ids = tokenize(request.text, model.cfg.d_vocab, model.cfg.n_ctx)
        import torch

        return model, source, torch.tensor(ids, device=model.W_E.device)

    def check_node(model, layer: int, head: int | None, mlp: bool = True) -> None:
        """Refuse a layer or head the model does not have; `head=None` means the MLP when `mlp`."""
        cfg = model.cfg
        if layer >= cfg.n_layers:
            raise BadInput(f"layer {layer} does not exist: the model has {cfg.n_layers} layers (0–{cfg.n_layers - 1})")
        if head is not None and head >= cfg.n_heads:
            raise BadInput(f"head {head} does not exist: layers have {cfg.n_heads} heads (0–{cfg.n_heads - 1})")
        if mlp and head is None and not getattr(model.blocks[layer], "has_mlp", False):
            raise BadInput(f"layer {layer} has no MLP (the model is attention-only)")

    def loss_response(logits, tokens) -> s.LossResponse:
        view = iv.loss_view(logits, tokens)
        ids = tokens.tolist()
        return s.LossResponse(tokens=ids, labels=token_labels(ids, logits.shape[-1]), loss=[finite(v) or 0.0 for v in view["loss"]],
                              copy_positions=view["copy_positions"], mean_loss=finite(view["mean_loss"]) or 0.0,
                              copy_loss=finite(view["copy_loss"]))

    @router.post("/architecture", response_model=s.Architecture)
    def architecture(request: s.ModelRef):
        model, source = session.model_for(request.run, request.step)
        cfg = model.cfg
        has_mlp = any(getattr(block, "has_mlp", False) for block in model.blocks)
        return s.Architecture(run=request.run, step=request.step, source=source, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                              has_mlp=has_mlp, d_model=cfg.d_model, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx)

    @router.post("/loss", response_model=s.LossResponse)
    def loss(request: s.TextRequest):
        import torch

        with session.lock:
            model, _, tokens = prepare(request)
            with torch.no_grad():
                logits = model(tokens[None])
            return loss_response(logits, tokens)

    @router.post("/attention", response_model=s.AttentionResponse)
    def attention(request: s.AttentionRequest):
        with session.lock:
            model, _, tokens = prepare(request)
            check_node(model, request.layer, request.head)
            pattern = iv.attention_pattern(model, tokens, request.layer, request.head)  # (T, T)
        ids = tokens.tolist()
        return s.AttentionResponse(tokens=ids, labels=token_labels(ids, model.cfg.d_vocab),
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
                ref = torch.tensor(tokenize(request.reference_text, model.cfg.d_vocab, model.cfg.n_ctx), device=tokens.device)
                if len(ref) < len(tokens):
                    raise BadInput(f"the reference text has {len(ref)} tokens and the text {len(tokens)}: "
                                   "freezing holds each position at the reference's value, so it needs at least as many")
                replacements = iv.node_values(model, ref[None], nodes)
            with torch.no_grad():
                clean = model(tokens[None])
            ablated = iv.ablated_logits(model, tokens, iv.ablation_hooks(nodes, replacements))
        before, after = loss_response(clean, tokens), loss_response(ablated, tokens)
        change = None if before.copy_loss is None or after.copy_loss is None else after.copy_loss - before.copy_loss
        return s.AblateResponse(clean=before, ablated=after, delta=[a - b for a, b in zip(after.loss, before.loss)],
                                copy_loss_change=change)

    @router.post("/patch", response_model=s.PatchResponse)
    def patch(request: s.PatchRequest):
        import torch

        with session.lock:
            model, _ = session.model_for(request.run, request.step)
            cfg = model.cfg
            clean = torch.tensor(tokenize(request.clean_text, cfg.d_vocab, cfg.n_ctx), device=model.W_E.device)
            corrupted = torch.tensor(tokenize(request.corrupted_text, cfg.d_vocab, cfg.n_ctx), device=model.W_E.device)
            if len(clean) != len(corrupted):
                raise BadInput(f"the two prompts must have the same number of tokens ({len(clean)} and {len(corrupted)})")
            head = request.head if request.hook == "head" else None
            if request.hook == "head" and head is None:
                raise BadInput("hook 'head' needs a head index")
            check_node(model, request.layer, head, mlp=request.hook == "mlp_out")
            if request.position is not None and request.position >= len(clean):
                raise BadInput(f"position {request.position} is past the end of the prompts ({len(clean)} tokens)")
            for name, token in (("answer", request.answer), ("wrong", request.wrong)):
                if token is not None and token >= cfg.d_vocab:
                    raise BadInput(f"{name} token {token} is outside the vocabulary ({cfg.d_vocab})")
            hook_name = {"head": f"blocks.{request.layer}.attn.hook_z", "resid_pre": f"blocks.{request.layer}.hook_resid_pre",
                         "attn_out": f"blocks.{request.layer}.hook_attn_out", "mlp_out": f"blocks.{request.layer}.hook_mlp_out",
                         "resid_post": f"blocks.{request.layer}.hook_resid_post"}[request.hook]
            result = iv.patch_logit_diff(model, clean, corrupted, hook_name, head, request.position, request.answer, request.wrong)
        return s.PatchResponse(**result)

    @router.post("/gradients", response_model=s.GradientResponse)
    def gradients(request: s.GradientRequest):
        with session.lock:
            model, _, tokens = prepare(request)
            if request.position is not None and request.position >= len(tokens) - 1:
                raise BadInput(f"position {request.position}: the text has {len(tokens) - 1} predictions (0–{len(tokens) - 2})")
            norms, loss = iv.embedding_gradients(model, tokens, request.position)
        ids = tokens.tolist()
        return s.GradientResponse(tokens=ids, labels=token_labels(ids, model.cfg.d_vocab), grad_norm=norms.tolist(), loss=loss)

    @router.post("/weights", response_model=s.WeightsResponse)
    def weights(request: s.WeightsRequest):
        with session.lock:
            model, _ = session.model_for(request.run, request.step)
            check_node(model, request.layer, request.head)
            found = iv.circuit_matrices(model, request.layer, request.head)
        return s.WeightsResponse(space=found["space"], labels=found["labels"],
                                 qk=(found["qk"].float() * 1e4).round().div(1e4).tolist(),
                                 ov=(found["ov"].float() * 1e4).round().div(1e4).tolist())

    return router

