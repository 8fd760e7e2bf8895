"""A tiny neutral document model (headings, paragraphs, tables, figures) rendered to Markdown and HTML.

Why: report.md and report.html must say the same thing; both renderers walk one list of blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Figure:
    title: str
    png: bytes


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_ci(v: float | None, ci: Sequence[float] | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if not ci:
        return fmt(v, digits)
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_p(p: float | None) -> str:
    return "–" if p is None else f"{p:.4f}"
