"""Linear leakage probes with patient-level folds, bootstrap CIs and a CLUB MI estimate.

Why these choices: a probe that sees the same patient in training and test folds measures
memorisation, not leakage, so folds are built from ``group_id`` and are identical for every model
compared. Balanced accuracy and macro AUC do not reward predicting the majority class; CIs come from
a cluster (patient-level) bootstrap of the out-of-fold predictions.

Information on an honest scale: ``I(a; z) >= H(a) − CE_heldout`` (nats), the held-out cross-entropy bound
(Barber–Agakov with the out-of-fold probe as the variational decoder), clipped to ``[0, H(a)]`` and shown
with ``H(a)`` beside it: a binary attribute can never carry more than ln 2 = 0.69 nats. The CLUB figure on
the same probabilities is kept, labelled as what it is: a variational *upper* bound that is valid only when
the probe fits, and that exceeds H(a) when the probe is over-confident on its misses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..io import stable_hash


@dataclass
class ProbeConfig:
    """Probe options (recorded in audit.json)."""

    folds: int = 5
    seed: int = 0
    C: float = 1.0  # inverse L2 strength of the logistic regression on standardised features
    max_iter: int = 500
    n_boot: int = 1000
    level: float = 0.95

    def validate(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds={self.folds}: expected >= 2")
        if self.C <= 0:
            raise ValueError(f"C={self.C}: expected > 0")
        if self.n_boot < 0:
            raise ValueError(f"n_boot={self.n_boot}: expected >= 0")


def grouped_folds(group_ids: Sequence[str], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per sample such that no group is in two folds (balanced sizes, seeded).

    Groups are shuffled with a seeded stream, then assigned largest-first to the currently smallest
    fold. The result depends only on the multiset of group ids and the seed, so every model audited on
    the same data gets the same folds.
    """
    groups = np.asarray([str(g) for g in group_ids])
    uniq, inv, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(uniq) < n_folds:
        raise ValueError(f"{len(uniq)} groups cannot fill {n_folds} folds; lower --folds")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stable_hash("audit-folds"),)))
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(n_folds, dtype=np.int64)
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += sizes[g]
    return fold_of_group[inv]


def fit_probe(X: np.ndarray, y: np.ndarray, folds: np.ndarray, n_classes: int, cfg: ProbeConfig) -> np.ndarray:
    """Out-of-fold class log-probabilities ``[N, K]`` of a standardised logistic-regression probe.

    A class missing from a training fold gets log-probability log(1e-12) (not -inf) so the MI estimate
    stays finite.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    out = np.full((len(y), n_classes), np.log(1e-12))
    for f in np.unique(folds):
        test = folds == f
        train = ~test
        present = np.unique(y[train])
        if len(present) < 2:  # nothing to learn: predict the training prior
            prior = np.bincount(y[train], minlength=n_classes) + 1e-12
            out[test] = np.log(prior / prior.sum())
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter))
        clf.fit(X[train], y[train])
        lp = np.clip(clf.predict_log_proba(X[test]), np.log(1e-12), 0.0)
        out[np.ix_(test, clf.classes_)] = lp
    return out


def _balanced_accuracy_w(y: np.ndarray, pred: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced accuracy for each row of the multiplicity matrix ``W[B, N]`` (classes absent in a row skipped)."""
    correct = (pred == y).astype(np.float64)
    recalls = []
    present = []
    for k in range(n_classes):
        mk = (y == k).astype(np.float64)
        denom = W @ mk
        recalls.append(np.where(denom > 0, (W @ (mk * correct)) / np.where(denom > 0, denom, 1), 0.0))
        present.append(denom > 0)
    R, P = np.stack(recalls, 1), np.stack(present, 1)
    return R.sum(1) / np.maximum(P.sum(1), 1)


def _auc_w(pos: np.ndarray, score: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC (ties count 1/2) for every row of ``W[B, N]``; NaN if a class is absent."""
    uniq, inv = np.unique(score, return_inverse=True)
    onehot = np.zeros((len(score), len(uniq)))
    onehot[np.arange(len(score)), inv] = 1.0
    wneg = W * (~pos)[None, :]
    wpos = W * pos[None, :]
    neg_block = wneg @ onehot  # [B, U]
    neg_before = np.cumsum(neg_block, axis=1) - neg_block
    credit = neg_before[:, inv] + 0.5 * neg_block[:, inv]  # [B, N]
    num = (wpos * credit).sum(1)
    den = wpos.sum(1) * wneg.sum(1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _macro_auc_w(y: np.ndarray, logp: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    if n_classes == 2:
        return _auc_w(y == 1, logp[:, 1] - logp[:, 0], W)
    aucs = np.stack([_auc_w(y == k, logp[:, k], W) for k in range(n_classes)], 1)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isnan(aucs), np.nan, aucs), axis=1)


def club_estimate(logp: np.ndarray, y: np.ndarray) -> float:
    """CLUB MI estimate (nats) from out-of-fold probe log-probabilities (fairllava.regularizer.club_mi)."""
    import torch

    from ..regularizer.club import club_mi

    return float(club_mi(torch.as_tensor(logp, dtype=torch.float64), torch.as_tensor(y, dtype=torch.long)))


def ba_lower_bound(logp: np.ndarray, y: np.ndarray) -> float:
    """Barber-Agakov bound H(Y) + E[log q(y|z)] (nats): a *lower* bound on I(Y; Z), unlike CLUB's upper one.

    CLUB exceeds log K when the probe is over-confident on its misses; reporting both brackets the truth.
    """
    counts = np.bincount(y, minlength=logp.shape[1]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() + logp[np.arange(len(y)), y].mean())


def information_bound(logp: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(max(0, min(H(a), H(a) − CE_heldout)), H(a))`` in nats, for each row of ``weights[B, N]`` (or once).

    ``H(a)`` is the entropy of the empirical class distribution of the probed samples, ``CE_heldout`` the mean
    out-of-fold cross-entropy ``−log q(y|z)``; the bound can therefore never exceed ``H(a)``.
    """
    y = np.asarray(y, dtype=np.int64)
    W = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    onehot = np.eye(logp.shape[1])[y]
    tot = W.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (W @ onehot) / tot[:, None]
        H = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
        ce = (W @ -logp[np.arange(len(y)), y]) / tot
    bound = np.clip(H - ce, 0.0, H)
    return (bound, H) if weights is not None else (bound[:1], H[:1])


def score_probe(logp: np.ndarray, y: np.ndarray, groups: Sequence[str], n_classes: int, cfg: ProbeConfig,
                key: tuple = ()) -> dict:
    """Point estimates and patient-level bootstrap CIs of balanced accuracy and macro AUC, plus CLUB MI."""
    from ..fairness.bootstrap import percentile_ci, resample_weights

    y = np.asarray(y, dtype=np.int64)
    pred = logp.argmax(1)
    ones = np.ones((1, len(y)))
    bacc = float(_balanced_accuracy_w(y, pred, ones, n_classes)[0])
    auc = float(_macro_auc_w(y, logp, ones, n_classes)[0])
    counts = np.bincount(y, minlength=n_classes)
    bound, entropy = information_bound(logp, y)
    club = club_estimate(logp, y)
    res = {
        "n": int(len(y)),
        "class_counts": counts.tolist(),
        "balanced_accuracy": bacc,
        "auc": auc,
        "info_lower_bound": float(bound[0]),  # nats, in [0, H(a)]: I(a; z) >= H(a) - CE_heldout
        "entropy": float(entropy[0]),  # H(a) in nats, the most information the attribute can carry
        "club_upper_bound": club,  # variational upper bound, valid only when the probe fits; may exceed H(a)
        "mi": club,  # (deprecated name of club_upper_bound)
        "mi_lower": ba_lower_bound(logp, y),  # unclipped H(a) - CE_heldout
        "chance_balanced_accuracy": 1.0 / int((counts > 0).sum() or 1),
        "chance_auc": 0.5,
        "ci": None,
    }
    if cfg.n_boot:
        uniq, inv = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        rng = np.random.default_rng(np.random.SeedSequence(int(cfg.seed),
                                                           spawn_key=(stable_hash("audit-boot", *key),)))
        Wg = resample_weights(len(uniq), cfg.n_boot, rng)
        W = Wg[:, inv]
        res["ci"] = {
            "balanced_accuracy": percentile_ci(_balanced_accuracy_w(y, pred, W, n_classes), cfg.level),
            "auc": percentile_ci(_macro_auc_w(y, logp, W, n_classes), cfg.level),
            "info_lower_bound": percentile_ci(information_bound(logp, y, W)[0], cfg.level),
        }
    return res
