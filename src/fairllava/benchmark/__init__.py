"""The shortcut benchmark: rendered tasks with a demographic shortcut of known strength, a resumable
multi-seed runner over training methods, and the leaderboard that compares them (docs/benchmark.md,
docs/protocol.md).

Modules: ``rendering`` (shared sampling and image helpers), ``derm`` / ``cxr`` (one renderer per task),
``evidence`` (the per-group evidence probe), ``prepare`` (``prepare_shortcut``), ``plan`` (the sweep's
schema), ``runner`` (stage 1 / stage 2 / generation / evaluation / audit per run), ``stats`` (the one
adapter to :mod:`fairllava.fairness`), ``leaderboard`` (aggregation) and ``report`` (markdown, CSV, HTML).
"""
from .prepare import prepare_shortcut
from .rendering import SPLITS, TASKS, VOCAB_CONFIG, ShortcutConfig, shortcut_vocabs

__all__ = ["SPLITS", "TASKS", "VOCAB_CONFIG", "ShortcutConfig", "prepare_shortcut", "shortcut_vocabs"]
