"""Matplotlib figures for evaluation reports, returned as PNG bytes (embedded base64 in report.html)."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _err(values: Sequence[float | None], cis: Sequence[list | None]) -> np.ndarray:
    lo = [0.0 if v is None or c is None else max(0.0, v - c[0]) for v, c in zip(values, cis)]
    hi = [0.0 if v is None or c is None else max(0.0, c[1] - v) for v, c in zip(values, cis)]
    return np.array([lo, hi])


def group_bars(result, attribute: str, metrics: Sequence[str]) -> bytes:
    """Grouped bars: one cluster per metric, one bar per group (n shown), 95% CI error bars; dashed = overall."""
    plt = _plt()
    groups = list(result.groups[attribute])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(metrics) * max(1, len(groups)) ** 0.5 + 2), 3.4))
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(metrics))
    excluded = result.excluded.get(attribute, {})
    for j, g in enumerate(groups):
        vals = [result.groups[attribute][g].get(m) for m in metrics]
        cis = [result.ci["groups"][attribute][g].get(m) for m in metrics]
        n = result.groups[attribute][g]["n"]
        label = f"{g} (n={n}{', excluded' if g in excluded else ''})"
        ax.bar(x + (j - (len(groups) - 1) / 2) * width, [0.0 if v is None else v for v in vals], width,
               yerr=_err(vals, cis), capsize=2, label=label, alpha=0.45 if g in excluded else 0.9)
    for i, m in enumerate(metrics):
        v = result.overall.get(m)
        if v is not None:
            ax.hlines(v, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(x, metrics, rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(f"{attribute}: per-group scores (95% CI; dashed = overall)")
    ax.legend(fontsize=7, ncols=2, loc="best")
    return _png(fig)


def gap_es_bars(results: dict, attribute: str, metrics: Sequence[str]) -> bytes:
    """Side-by-side gap and ES per metric for one or more systems, with 95% CIs."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.2 * len(metrics) * len(results) + 3), 3.2))
    width = 0.8 / max(1, len(results))
    x = np.arange(len(metrics))
    for k, (name, r) in enumerate(results.items()):
        es_key = "es" if r.es_variant == "maxmin" else "es_fairclip"
        for ax, key, vals in ((axes[0], "gap", r.gap.get(attribute, {})), (axes[1], es_key, r.es_reported.get(attribute, {}))):
            v = [vals.get(m) for m in metrics]
            c = [r.ci[key].get(attribute, {}).get(m) for m in metrics]
            ax.bar(x + (k - (len(results) - 1) / 2) * width, [0.0 if a is None else a for a in v], width,
                   yerr=_err(v, c), capsize=2, label=name)
    axes[0].set_title(f"{attribute}: gap (max - min), lower is fairer")
    axes[1].set_title(f"{attribute}: equity-scaled score, higher is better")
    for ax in axes:
        ax.set_xticks(x, metrics, rotation=20, ha="right")
        ax.set_ylabel("percent")
        if len(results) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
