"""Per-sample sufficient statistics: the one representation every metric is reduced from.

Why: a corpus metric (BLEU, macro-F1) on any subset or bootstrap resample is a function of the *sums*
of per-sample statistics, so group scores and 1000 resamples are a matrix product away instead of a
re-scoring. Per-sample metrics (ROUGE-L, METEOR, ...) are the special case K=1 and reduce = mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Reducer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class MetricStats:
    """One metric on N samples: ``value(subset) = reduce(sum of stats[subset], len(subset))``.

    ``stats`` is ``[N, K]``; ``reduce(sums[..., K], n[...]) -> values[...]`` is vectorised over leading
    axes so one call scores every bootstrap resample. Values are in percent (0-100).
    """

    name: str
    stats: np.ndarray
    reduce: Reducer
    level: str = "per-sample"  # or "corpus"
    per_sample: np.ndarray | None = None  # [N] score written to scores_per_sample.jsonl (None for corpus)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats = np.asarray(self.stats, dtype=np.float64)
        if self.stats.ndim == 1:
            self.stats = self.stats[:, None]

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    def value(self, idx: np.ndarray | None = None) -> float:
        s = self.stats if idx is None else self.stats[idx]
        return float(self.reduce(s.sum(axis=0), np.asarray(float(s.shape[0]))))

    def weighted(self, weights: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """Values for each row of ``weights`` ([B, N] or [B, len(idx)] resample multiplicities)."""
        s = self.stats if idx is None else self.stats[idx]
        sums = weights @ s
        return self.reduce(sums, weights.sum(axis=1))

    def subset(self, idx: np.ndarray) -> "MetricStats":
        ps = None if self.per_sample is None else self.per_sample[idx]
        return MetricStats(self.name, self.stats[idx], self.reduce, self.level, ps, dict(self.meta))


def _mean_reduce(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, sums[..., 0] / np.where(n > 0, n, 1), np.nan)


def mean_metric(name: str, scores: np.ndarray, meta: dict | None = None) -> MetricStats:
    """A per-sample metric already in percent; its group value is the mean over the group."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-sample scores, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: per-sample scores contain NaN/inf")
    return MetricStats(name, scores[:, None], _mean_reduce, "per-sample", scores, dict(meta or {}))
