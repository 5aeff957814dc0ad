"""mkdocs hook: the command-line reference, generated from the Typer app in phaselens.cli.

`<!-- cli-reference -->` in docs/reference/cli.md is replaced by one section per command: its
synopsis, its help text and a table of its arguments and options with the help `--help` prints,
read from the command tree Typer builds, so the page cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- cli-reference -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def command_sections(group: Any, prog: str = "phaselens") -> str:
    """Markdown for every visible command of a Typer/click group, in the order they are declared."""
    context_class = type(group).context_class
    root = context_class(group, info_name=prog)
    parts: list[str] = []
    for name, command in group.commands.items():
        if command.hidden:
            continue
        ctx = context_class(command, info_name=name, parent=root)
        records = [(p.param_type_name, p.get_help_record(ctx)) for p in command.get_params(ctx)
                   if p.name != "help" and not getattr(p, "hidden", False)]
        parts.append(f"## `{prog} {name}`\n")
        parts.append(f"```text\n{prog} {name} {' '.join(command.collect_usage_pieces(ctx))}\n```\n")
        if command.help:
            parts.append(command.help.strip().split("\f")[0] + "\n")
        rows = [(kind, record) for kind, record in records if record]
        if rows:
            parts.append("| argument or option | meaning |\n|---|---|")
            parts.extend(f"| `{_cell(opts)}` | {_cell(help_text)} |" for kind, (opts, help_text) in rows)
            parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    if MARKER not in markdown:
        return markdown
    import typer.main

    from phaselens.cli import app

    return markdown.replace(MARKER, command_sections(typer.main.get_command(app)))
