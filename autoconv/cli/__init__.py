"""The `autoconv` command: a thin typer + rich layer over the library."""

from autoconv.cli.main import app, main

__all__ = ["app", "main"]
