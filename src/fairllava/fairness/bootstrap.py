"""Seeded bootstrap as resample-multiplicity matrices (iid, stratified, or over whole clusters).

Why matrices: a resample is a vector of multiplicities ``w`` (how often each sample was drawn), so any
sum-of-statistics metric on it is ``w @ stats``; 1000 resamples are one ``[B, N] @ [N, K]`` product.
Seeds are ``SeedSequence(seed, spawn_key=(stable_hash(run, attribute, metric),))`` (EVALUATION §5.2): every
(attribute, metric) cell gets its own reproducible stream, independent of evaluation order and process.
Clusters (``group_id``: a patient's several studies, a lesion's several images) are resampled whole when
given, because their samples are correlated and an iid bootstrap of them gives intervals that are too narrow.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..io import stable_hash


def rng_for(seed: int, run: str, attribute: str, metric: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stable_hash(run, attribute, metric),)))


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """Row-wise bincount of ``draws[B, m]`` (indices < n) -> multiplicities ``[B, n]``."""
    B = draws.shape[0]
    flat = (draws + (np.arange(B, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=B * n).reshape(B, n).astype(np.float64)


CHUNK = 100  # resamples per block: bounds memory at CHUNK x N floats; fixed so results never depend on N


def cluster_inverse(group_ids: Sequence | None) -> np.ndarray | None:
    """Cluster index of each sample (order of first appearance), or None when there are no cluster ids."""
    if group_ids is None:
        return None
    seen: dict = {}
    return np.array([seen.setdefault(g, len(seen)) for g in group_ids], dtype=np.int64)


def iter_resample_weights(n: int, n_boot: int, rng: np.random.Generator,
                          strata: Sequence[np.ndarray] | None = None,
                          clusters: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Blocks of ``[<=CHUNK, n]`` multiplicities of iid resamples, or resamples stratified by ``strata``
    (index arrays partitioning ``range(n)``; each stratum keeps its size).

    With ``clusters`` (cluster index per sample, e.g. from :func:`cluster_inverse`) whole clusters are drawn
    and every sample takes its cluster's multiplicity; a cluster belongs to the stratum of its first sample.
    """
    if clusters is not None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if clusters.shape != (n,):
            raise ValueError(f"clusters has shape {clusters.shape}; expected ({n},)")
        n_c = int(clusters.max()) + 1 if n else 0
        c_strata = None
        if strata is not None:
            owner = np.full(n_c, -1, dtype=np.int64)
            for k, idx in enumerate(strata):
                idx = np.asarray(idx, dtype=np.int64)
                first = clusters[idx]
                unset = owner[first] < 0
                owner[first[unset]] = k  # first stratum seen wins (the order of strata, then of samples)
            c_strata = [np.flatnonzero(owner == k) for k in range(len(strata))]
            c_strata = [c for c in c_strata if len(c)]
            missing = np.flatnonzero(owner < 0)
            if len(missing):
                raise ValueError(f"strata cover {n_c - len(missing)} of {n_c} clusters; they must partition the sample set")
        for Wc in iter_resample_weights(n_c, n_boot, rng, c_strata):
            yield Wc[:, clusters]
        return
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if strata is not None:
        strata = [np.asarray(idx, dtype=np.int64) for idx in strata if len(idx)]
        covered = sum(len(idx) for idx in strata)
        if covered != n:
            raise ValueError(f"strata cover {covered} of {n} samples; they must partition the sample set")
    for start in range(0, n_boot, CHUNK):
        b = min(CHUNK, n_boot - start)
        if strata is None:
            yield _counts(rng.integers(0, n, size=(b, n)), n)
            continue
        W = np.zeros((b, n))
        for idx in strata:
            W[:, idx] += _counts(rng.integers(0, len(idx), size=(b, len(idx))), len(idx))
        yield W


def resample_weights(n: int, n_boot: int, rng: np.random.Generator,
                     strata: Sequence[np.ndarray] | None = None, clusters: np.ndarray | None = None) -> np.ndarray:
    """All ``[n_boot, n]`` multiplicities at once (same draws as :func:`iter_resample_weights`)."""
    return np.vstack(list(iter_resample_weights(n, n_boot, rng, strata, clusters)))


def bootstrap_scores(score_fn, n: int, n_boot: int, rng: np.random.Generator,
                     strata: Sequence[np.ndarray] | None = None,
                     clusters: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Apply ``score_fn(W) -> {name: [b, ...]}`` block by block and concatenate along the resample axis."""
    parts: dict[str, list[np.ndarray]] = {}
    for W in iter_resample_weights(n, n_boot, rng, strata, clusters):
        for k, v in score_fn(W).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of bootstrap replicates (NaN replicates ignored); None if all are NaN."""
    samples = np.asarray(samples, dtype=np.float64)
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def bca_ci(samples: np.ndarray, point: float, jackknife: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Bias-corrected and accelerated interval (Efron 1987) from bootstrap replicates and jackknife values.

    Why: the percentile interval of a statistic whose bootstrap distribution is shifted or skewed relative
    to the estimate (a difference of small-sample proportions, a corpus metric) covers less than its level;
    BCa corrects the median bias (``z0``, ties counted half) and the skew (acceleration ``a`` from the
    leave-one-unit-out ``jackknife`` values). Falls back to the percentile interval when ``a`` is undefined.
    """
    from scipy.special import ndtr, ndtri  # (scipy.stats takes seconds to import)

    samples = np.asarray(samples, dtype=np.float64)
    finite = samples[np.isfinite(samples)]
    if finite.size == 0 or not np.isfinite(point):
        return percentile_ci(samples, level)
    below = np.mean(finite < point) + 0.5 * np.mean(finite == point)
    below = float(np.clip(below, 1.0 / (finite.size + 1), finite.size / (finite.size + 1)))
    z0 = ndtri(below)
    jk = np.asarray(jackknife, dtype=np.float64)
    jk = jk[np.isfinite(jk)]
    a = 0.0
    if jk.size >= 3:
        d = jk.mean() - jk
        den = 6.0 * np.sum(d ** 2) ** 1.5
        a = float(np.sum(d ** 3) / den) if den > 0 else 0.0
    z = ndtri(np.array([(1 - level) / 2, (1 + level) / 2]))
    adj = ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))
    lo, hi = np.percentile(finite, 100 * adj)
    return [float(lo), float(hi)]
