"""Closed-set VQA scoring: parse a class label out of free text, then accuracy / macro-F1 / balanced accuracy.

Parsing follows EVALUATION.md §2.3: case-insensitive word-boundary matches of the class codes and their
name fallbacks; the **earliest** match in the text wins (ties: the longest match), no match -> ``UNK``
(always wrong). The label set is a parameter so a benchmark's own classes (e.g. MEL/NV/VASC) can be used.
Macro-F1 and balanced accuracy are corpus metrics over the classes present in ``y_true`` of the scored
subset; they are reduced from per-sample one-hot confusion statistics so bootstraps stay cheap.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .base import MetricStats, mean_metric

UNK = "UNK"

HAM_NAMES: dict[str, list[str]] = {
    "AKIEC": ["actinic keratosis", "actinic keratoses", "bowen's disease", "bowen's", "bowens disease", "bowen disease",
              "intraepithelial carcinoma"],
    "BCC": ["basal cell carcinoma"],
    "BKL": ["benign keratosis", "seborrheic keratosis", "seborrhoeic keratosis", "solar lentigo", "lentigo"],
    "DF": ["dermatofibroma"],
    "MEL": ["melanoma"],
    "NV": ["nevus", "naevus", "nevi", "naevi"],
    "VASC": ["vascular", "angioma", "angiokeratoma", "pyogenic granuloma"],
}


@dataclass
class LabelSet:
    """Class codes plus name fallbacks (both matched case-insensitively on word boundaries)."""

    codes: list[str]
    names: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = [c.strip().upper() for c in self.codes]
        if not self.codes or len(set(self.codes)) != len(self.codes) or any(not c for c in self.codes):
            raise ValueError(f"labels: expected distinct non-empty class codes, got {self.codes}")
        if UNK in self.codes:
            raise ValueError(f"labels: {UNK!r} is reserved for unparseable answers")
        alternatives: list[tuple[str, str]] = []
        for code in self.codes:
            for phrase in [code] + list(self.names.get(code, [])):
                alternatives.append((phrase, code))
        # Longest phrase first so that at one start position the longest alternative wins.
        alternatives.sort(key=lambda pc: -len(pc[0]))
        self._code_of = {p.lower(): c for p, c in alternatives}
        pattern = "|".join(re.escape(p) for p, _ in alternatives)
        self._regex = re.compile(rf"(?<!\w)(?:{pattern})(?!\w)", re.IGNORECASE)

    @classmethod
    def ham(cls, codes: Sequence[str] | None = None) -> "LabelSet":
        """HAM10000 classes (all 7, or a subset such as ``["MEL", "NV", "VASC"]``) with their name fallbacks."""
        codes = [c.strip().upper() for c in (codes or list(HAM_NAMES))]
        return cls(codes, {c: HAM_NAMES[c] for c in codes if c in HAM_NAMES})

    def parse(self, text: str) -> str:
        m = self._regex.search(text or "")  # leftmost match; alternation order makes it the longest there
        return self._code_of[m.group(0).lower()] if m else UNK


def parse_labels(texts: Sequence[str], labels: LabelSet | None = None) -> list[str]:
    labels = labels or LabelSet.ham()
    return [labels.parse(t) for t in texts]


def _confusion_stats(y_true: Sequence[str], y_pred: Sequence[str], classes: list[str]) -> np.ndarray:
    """``[N, 3C]``: one-hot true class, one-hot predicted class, one-hot true positive."""
    idx = {c: i for i, c in enumerate(classes)}
    C = len(classes)
    out = np.zeros((len(y_true), 3 * C), dtype=np.float64)
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        out[i, idx[t]] = 1.0
        if p in idx:
            out[i, C + idx[p]] = 1.0
            if p == t:
                out[i, 2 * C + idx[t]] = 1.0
    return out


def _macro_f1_reducer(C: int):
    def reduce(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
        true, pred, tp = sums[..., :C], sums[..., C:2 * C], sums[..., 2 * C:]
        present = true > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(present, 2 * tp / np.where(true + pred > 0, true + pred, 1), 0.0)
            return 100.0 * np.where(present.any(-1), f1.sum(-1) / present.sum(-1), np.nan)
    return reduce


def _balanced_acc_reducer(C: int):
    def reduce(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
        true, tp = sums[..., :C], sums[..., 2 * C:]
        present = true > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = np.where(present, tp / np.where(present, true, 1), 0.0)
            return 100.0 * np.where(present.any(-1), rec.sum(-1) / present.sum(-1), np.nan)
    return reduce


def vqa_metrics(predictions: Sequence[str], true_labels: Sequence[str], labels: LabelSet | None = None
                ) -> tuple[dict[str, MetricStats], list[str]]:
    """Accuracy (per-sample), macro-F1 and balanced accuracy (corpus); returns ``(metrics, parsed_labels)``.

    ``true_labels`` must be codes of ``labels`` (case-insensitive); ValueError names the first offender.
    """
    labels = labels or LabelSet.ham()
    y_true = [str(t).strip().upper() for t in true_labels]
    bad = [(i, t) for i, t in enumerate(y_true) if t not in labels.codes]
    if bad:
        i, t = bad[0]
        raise ValueError(f"row {i}: true label {t!r} is not one of {labels.codes} ({len(bad)} such rows)")
    y_pred = parse_labels(predictions, labels)
    correct = np.array([100.0 * (p == t) for p, t in zip(y_pred, y_true)])
    stats = _confusion_stats(y_true, y_pred, labels.codes)
    C = len(labels.codes)
    meta = {"package": "fairllava", "labels": labels.codes, "scale": "percent", "unparsed": "UNK, scored wrong",
            "classes": "those present in y_true of the scored subset"}
    return {
        "accuracy": mean_metric("accuracy", correct, dict(meta, level="per-sample mean")),
        "macro_f1": MetricStats("macro_f1", stats, _macro_f1_reducer(C), "corpus", None, dict(meta, level="corpus")),
        "balanced_accuracy": MetricStats("balanced_accuracy", stats, _balanced_acc_reducer(C), "corpus", None,
                                         dict(meta, level="corpus")),
    }, y_pred
