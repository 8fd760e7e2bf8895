"""Counterfactual matched pairs, EVALUATION §5.5.

Why: two patients with identical clinical labels and near-identical images who differ only in a
demographic attribute should get equally good reports. Pairs are matched greedily one-to-one by cosine
similarity of image embeddings within buckets of identical clinical-label keys (highest similarity first,
ties by index, at least ``min_similarity``); the score is mean |M(a) − M(b)| over pairs with a bootstrap
CI over pairs.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

from .bootstrap import percentile_ci, rng_for


def match_pairs(embeddings: np.ndarray, attribute_values: Sequence[str | None], label_keys: Sequence[Hashable],
                groups: tuple[str, str] = ("F", "M"), min_similarity: float = 0.0) -> list[tuple[int, int, float]]:
    """Greedy one-to-one pairs ``(i in groups[0], j in groups[1], cosine)`` within identical label keys."""
    X = np.asarray(embeddings, dtype=np.float64)
    n = len(attribute_values)
    if X.ndim != 2 or X.shape[0] != n or len(label_keys) != n:
        raise ValueError(f"embeddings [{X.shape}], attribute_values ({n}) and label_keys ({len(label_keys)}) must align")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norms > 0, norms, 1.0)
    a, b = groups
    buckets: dict[Hashable, tuple[list[int], list[int]]] = {}
    for i, (v, k) in enumerate(zip(attribute_values, label_keys)):
        if k is None or v not in (a, b):
            continue
        buckets.setdefault(k, ([], []))[0 if v == a else 1].append(i)
    pairs = []
    for key in sorted(buckets, key=repr):
        A, Bi = buckets[key]
        if not A or not Bi:
            continue
        S = X[A] @ X[Bi].T
        # Highest similarity first; stable sort breaks ties by (row, column) = index order.
        order = np.argsort(-S, axis=None, kind="stable")
        used_a, used_b = set(), set()
        limit = min(len(A), len(Bi))
        for flat in order:
            p, q = divmod(int(flat), len(Bi))
            if S[p, q] < min_similarity or len(used_a) == limit:
                break
            if p in used_a or q in used_b:
                continue
            used_a.add(p)
            used_b.add(q)
            pairs.append((A[p], Bi[q], float(S[p, q])))
    return pairs


def counterfactual_gap(scores: dict[str, np.ndarray], pairs: Sequence[tuple[int, int, float]], n_boot: int = 1000,
                       seed: int = 0, run: str = "counterfactual", attribute: str = "pairs") -> dict[str, dict]:
    """Per metric: ``{"n_pairs", "mean_abs_diff", "ci"}`` with a percentile bootstrap over pairs."""
    out = {}
    if not pairs:
        return {m: {"n_pairs": 0, "mean_abs_diff": None, "ci": None} for m in scores}
    I = np.array([p[0] for p in pairs])
    J = np.array([p[1] for p in pairs])
    for m, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        d = np.abs(s[I] - s[J])
        ci = None
        if n_boot:
            rng = rng_for(seed, run, attribute, m)
            draws = rng.integers(0, len(d), size=(n_boot, len(d)))
            ci = percentile_ci(d[draws].mean(axis=1))
        out[m] = {"n_pairs": int(len(d)), "mean_abs_diff": float(d.mean()), "ci": ci}
    return out


def report_label_keys(references: Sequence[str], extra: Sequence[Hashable] | None = None) -> list[tuple]:
    """Bucket keys for matching: the binarised 14-finding rule labels of each reference (plus e.g. the view)."""
    from ..metrics.chexpert_rules import binarize, label_reports

    labels = binarize(label_reports(list(references))).astype(int)
    keys = [tuple(row) for row in labels.tolist()]
    if extra is not None:
        if len(extra) != len(keys):
            raise ValueError(f"extra has {len(extra)} entries for {len(keys)} references")
        keys = [k + (e,) for k, e in zip(keys, extra)]
    return keys
