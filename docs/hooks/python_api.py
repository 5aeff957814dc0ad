"""mkdocs hook: the Python API page lists every public name of `import phaselens as pl`.

`<!-- python-api -->` in docs/reference/python-api.md becomes one mkdocstrings block per name of
`phaselens.__all__`, pointing at the module that defines it, so a name added to the package shows up
with its docstring and signature without editing the page.
"""

from __future__ import annotations

MARKER = "<!-- python-api -->"


def api_blocks() -> str:
    import phaselens

    names = [name for name in phaselens.__all__ if not name.startswith("__")]
    return "\n".join(f"::: {getattr(phaselens, name).__module__}.{name}\n" for name in sorted(names, key=str.lower))


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    return markdown.replace(MARKER, api_blocks()) if MARKER in markdown else markdown
