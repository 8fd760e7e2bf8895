"""Render report blocks to Markdown (figures are only in report.html; the Markdown says so)."""
from __future__ import annotations

from .document import Figure, Heading, Para, Table, fmt


def _cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks) -> str:
    out: list[str] = []
    n_fig = 0
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text + "\n")
        elif isinstance(b, Para):
            out.append(b.text + "\n")
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in b.rows)
            out.append("")
        elif isinstance(b, Figure):
            n_fig += 1
            out.append(f"*Figure {n_fig}: {b.title} (see report.html).*\n")
    return "\n".join(out).rstrip() + "\n"
