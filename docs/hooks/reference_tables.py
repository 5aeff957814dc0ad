"""mkdocs hook: reference tables generated from the code at build time.

- `<!-- config-reference -->`: every config key of every model kind and task, and of `train` and
  `telemetry`, with its type, default and the comment beside its field in the source;
- `<!-- probe-options -->`: every registered probe's options (its constructor's keyword arguments);
- `<!-- http-api -->`: every route of the dashboard's FastAPI app with its summary.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing


def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's own source, by field name."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+)$", source, flags=re.M):
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value!r}`"


def dataclass_table(prefix: str, cls: type) -> str:
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls) if hasattr(cls, "__annotations__") else {}
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        kind = getattr(hints.get(field.name), "__name__", None) or str(hints.get(field.name, field.type))
        kind = kind.replace("typing.", "")
        rows.append(f"| `{prefix}.{field.name}` | `{_cell(kind)}` | {_cell(_default(field))} | "
                    f"{_cell(comments.get(field.name, ''))} |")
    return "\n".join(rows)


def config_reference() -> str:
    from phaselens.models import config as model_config
    from phaselens.tasks.config import task_config_class, task_names
    from phaselens.training.config import TelemetryConfig, TrainConfig

    model_config._load_builtin()
    parts = ["### `train`", dataclass_table("train", TrainConfig),
             "### `telemetry`", dataclass_table("telemetry", TelemetryConfig)]
    for kind in sorted(model_config._KINDS):
        parts += [f"### `model` with `model.kind={kind}`", dataclass_table("model", model_config.model_config_class(kind))]
    seen: set[type] = set()
    for name in task_names():
        cls = task_config_class(name)
        if cls in seen:
            continue
        seen.add(cls)
        aliases = [n for n in task_names() if task_config_class(n) is cls]
        parts += [f"### `data` with `data.task={' | '.join(aliases)}`", dataclass_table("data", cls)]
    return "\n\n".join(parts)


def probe_options() -> str:
    from phaselens.probes.base import probe_class, probe_names

    rows = ["| probe | option | default |", "|---|---|---|"]
    for name in probe_names():
        signature = inspect.signature(probe_class(name).__init__)
        options = [p for p in signature.parameters.values()
                   if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not options:
            rows.append(f"| `{name}` | – | – |")
        for p in options:
            default = "required" if p.default is p.empty else f"`{p.default!r}`"
            rows.append(f"| `{name}` | `{p.name}` | {_cell(default)} |")
    return "\n".join(rows)


def http_api() -> str:
    """The API's routes, read from the app's own OpenAPI document (the contract the page and the tests share)."""
    from phaselens.server.app import create_app
    from phaselens.server.session import Session

    app = create_app(Session([]))
    rows = ["| method | path | what it does | request body | response |", "|---|---|---|---|---|"]

    def schema_name(content: dict) -> str:
        ref = ((content or {}).get("application/json") or {}).get("schema", {}).get("$ref", "")
        return f"`{ref.rsplit('/', 1)[-1]}`" if ref else "–"

    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            doc = (operation.get("description") or operation.get("summary") or "").strip().split("\n")[0]
            body = schema_name((operation.get("requestBody") or {}).get("content"))
            response = schema_name(((operation.get("responses") or {}).get("200") or {}).get("content"))
            rows.append(f"| {method.upper()} | `{path}` | {_cell(doc)} | {body} | {response} |")
    events = [r.path for r in app.routes if type(r).__name__ == "APIWebSocketRoute"]
    rows += [f"| WebSocket | `{path}` | pushes a message when a served run's files change | – | – |" for path in events]
    return "\n".join(rows)


GENERATORS = {"<!-- config-reference -->": config_reference, "<!-- probe-options -->": probe_options,
              "<!-- http-api -->": http_api}


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
