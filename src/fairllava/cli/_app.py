from __future__ import annotations

import typer

from ..progress import console  # the library's one stderr console (re-exported for the CLI modules)

app = typer.Typer(
    name="fairllava",
    help="Fair fine-tuning (FairLLaVA) and fairness auditing of vision-language assistants.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
