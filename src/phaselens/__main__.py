"""`python -m phaselens ...` runs the command-line tool (the same as the `phaselens` script)."""

from phaselens.cli import app

app()
