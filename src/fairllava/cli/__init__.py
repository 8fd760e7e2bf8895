"""The ``fairllava`` command line: a thin typer layer over library functions.

Each verb lives in its own module and registers itself on ``app``. User errors
(:class:`fairllava.errors.FairllavaError`) print one red line and exit with code 2.
"""
from __future__ import annotations

import sys

from ._app import app, console

# Importing the modules registers their commands.
from . import data_cmds, eval_cmds, train_cmds, model_cmds, demo_cmds, audit_cmds, benchmark_cmds  # noqa: E402,F401


def main() -> None:
    from ..errors import FairllavaError

    try:
        app()
    except FairllavaError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


__all__ = ["app", "main"]
