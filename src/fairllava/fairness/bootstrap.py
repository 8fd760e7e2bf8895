"""Seeded percentile bootstrap as resample-multiplicity matrices.

Why matrices: a resample is a vector of multiplicities ``w`` (how often each sample was drawn), so any
sum-of-statistics metric on it is ``w @ stats``; 1000 resamples are one ``[B, N] @ [N, K]`` product.
Seeds are ``SeedSequence(seed, spawn_key=(stable_hash(run, attribute, metric),))`` (EVALUATION §5.2): every
(attribute, metric) cell gets its own reproducible stream, independent of evaluation order and process.
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


def iter_resample_weights(n: int, n_boot: int, rng: np.random.Generator,
                          strata: Sequence[np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """Blocks of ``[<=CHUNK, n]`` multiplicities of iid resamples, or resamples stratified by ``strata``
    (index arrays partitioning ``range(n)``; each stratum keeps its size)."""
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
                     strata: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """All ``[n_boot, n]`` multiplicities at once (same draws as :func:`iter_resample_weights`)."""
    return np.vstack(list(iter_resample_weights(n, n_boot, rng, strata)))


def bootstrap_scores(score_fn, n: int, n_boot: int, rng: np.random.Generator,
                     strata: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Apply ``score_fn(W) -> {name: [b, ...]}`` block by block and concatenate along the resample axis."""
    parts: dict[str, list[np.ndarray]] = {}
    for W in iter_resample_weights(n, n_boot, rng, strata):
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
