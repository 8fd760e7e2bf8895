"""CLI verbs: train_cmds (owned by one module; see cli/__init__.py)."""
from ._app import app, console  # noqa: F401
