"""mkdocs hook: the Python API page lists every public name of `import phaselens as pl`.

`<!-- python-api -->` in docs/reference/python-api.md becomes one mkdocstrings block per name of
`phaselens.__all__`, pointing at the module that defines it, so a name added to the package shows up
with its docstring and signature without editing the page.
"""

from __future__ import annotations

MARKER = "<!-- python-api -->"


def api_blocks() -> str:
    import phaselens

    blocks: list[str] = []
    for name in sorted(phaselens._LAZY, key=str.lower):
        blocks.append(f"::: {phaselens._LAZY[name]}.{name}\n")
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    return markdown.replace(MARKER, api_blocks()) if MARKER in markdown else markdown
