"""Render report blocks to one self-contained HTML page (PNG figures embedded as base64 data URIs)."""
from __future__ import annotations

import base64
import html
import re

from .document import Figure, Heading, Para, Table, fmt

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.88em}th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0 1.2em}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em}code{background:#f5f5f5}"""


def _bold(text: str) -> str:
    """``**x**`` (the Markdown the verdict lines use) -> ``<strong>x</strong>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def render_html(blocks, title: str) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{_bold(html.escape(b.text))}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(fmt(h))}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(b.title)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(b.title)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
