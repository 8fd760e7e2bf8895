"""An offline, rule-based CheXpert-style labeler (keywords + negation/uncertainty, sentence level).

This is an **approximation** of the CheXpert labeler's 14 findings so a clinical-label F1 can be
computed anywhere without model weights. Its scores are reported as ``keyword_f1_*`` and must never be
presented as CheXbert F1. Rules: a sentence mentioning a finding's keyword is *negative* if a negation cue
precedes the keyword in the same clause, *uncertain* if an uncertainty cue occurs in the sentence, else
*positive*; over sentences positive > uncertain > negative. ``No Finding`` is positive when no pathology
(anything but Support Devices) is positive or uncertain. Binarisation: uncertain -> negative (default) or
positive (``uncertain_positive=True``).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from .base import MetricStats

CONDITIONS = [
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
]
CONDITIONS_5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

KEYWORDS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [r"(?:enlarged|widened|widening of the) (?:cardio)?mediastin\w*", r"mediastinal widening",
                                   r"mediastinum is (?:widened|enlarged)", r"cardiomediastinal silhouette is (?:enlarged|widened)"],
    "Cardiomegaly": [r"cardiomegaly", r"(?:enlarged|large|increased) (?:cardiac|heart) (?:silhouette|size|shadow)",
                     r"heart (?:size )?is (?:mildly |moderately |severely )?(?:enlarged|large)", r"cardiac enlargement"],
    "Lung Opacity": [r"opacit(?:y|ies)", r"infiltrat\w*", r"air ?space disease", r"(?:hazy|patchy) (?:density|densities)",
                     r"ground[- ]glass", r"reticular\w*"],
    "Lung Lesion": [r"nodules?", r"mass(?:es)?", r"lesions?", r"tumou?rs?", r"neoplasms?", r"carcinoma", r"cavitary lesions?"],
    "Edema": [r"edema", r"oedema", r"vascular congestion", r"pulmonary congestion", r"heart failure", r"chf"],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"pneumonia", r"infection", r"infectious process"],
    "Atelectasis": [r"atelecta\w*", r"collapse"],
    "Pneumothorax": [r"pneumothora(?:x|ces)", r"hydropneumothorax"],
    "Pleural Effusion": [r"(?:pleural )?effusions?", r"hydrothorax", r"fluid in the (?:pleural|costophrenic)"],
    "Pleural Other": [r"pleural thickening", r"fibrothorax", r"pleural scar\w*", r"pleural plaques?", r"pleural calcification"],
    "Fracture": [r"fractur\w*"],
    "Support Devices": [r"(?:endotracheal|et|tracheostomy|chest|nasogastric|ng|enteric|feeding) tubes?", r"catheters?",
                        r"pacemakers?", r"picc(?: line)?", r"central (?:venous )?line", r"lines?", r"stents?", r"wires?",
                        r"valve replacement", r"prosthe\w*", r"devices?", r"icd", r"port-?a-?cath", r"clips?"],
}

_NEGATION = re.compile(
    r"(?<!\w)(?:no|not|without|negative for|free of|clear of|absence of|resolved|resolution of|ruled out|rule out|"
    r"removed|there is no|there are no|no evidence of|no signs? of|none)(?!\w)", re.IGNORECASE)
_UNCERTAIN = re.compile(
    r"(?<!\w)(?:may|might|possible|possibly|probable|probably|likely|suggest\w*|question(?:able)?|cannot be excluded|"
    r"can not be excluded|not excluded|could|concern for|suspicious|suspected|versus|vs|differential|equivocal|"
    r"borderline|indeterminate|consider\w*)(?!\w)", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"(?<!\w)(?:but|however|although|though|with|which|and there is|and there are)(?!\w)|;", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_PATTERNS = {c: re.compile(r"(?<!\w)(?:" + "|".join(k) + r")(?!\w)", re.IGNORECASE) for c, k in KEYWORDS.items()}

POSITIVE, UNCERTAIN, NEGATIVE, BLANK = 1, -1, 0, np.nan


def _mention_state(sentence: str, start: int) -> int:
    head = sentence[:start]
    breaks = [m.end() for m in _CLAUSE_BREAK.finditer(head)]
    clause = head[breaks[-1]:] if breaks else head
    if _NEGATION.search(clause):
        return NEGATIVE
    if _UNCERTAIN.search(sentence):
        return UNCERTAIN
    return POSITIVE


def label_report(text: str) -> np.ndarray:
    """14 labels in CheXpert order: 1 positive, -1 uncertain, 0 negative, NaN not mentioned."""
    out = np.full(len(CONDITIONS), np.nan)
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
    for sentence in _SENTENCE.split(text or ""):
        for j, cond in enumerate(CONDITIONS[:-1]):
            for m in _PATTERNS[cond].finditer(sentence):
                state = _mention_state(sentence, m.start())
                if np.isnan(out[j]) or rank[state] > rank[int(out[j])]:
                    out[j] = state
    pathologies = [out[j] for j, c in enumerate(CONDITIONS[:-1]) if c != "Support Devices"]
    out[-1] = 0.0 if any(v in (POSITIVE, UNCERTAIN) for v in pathologies) else 1.0
    return out


def label_reports(texts: Sequence[str]) -> np.ndarray:
    return np.stack([label_report(t) for t in texts]) if len(texts) else np.zeros((0, len(CONDITIONS)))


def binarize(labels: np.ndarray, uncertain_positive: bool = False) -> np.ndarray:
    """CheXbert-style binarisation: blank -> 0, uncertain -> 0 (or 1 for the "+" variant), positive -> 1."""
    lab = np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=0.0)
    return ((lab == 1) | ((lab == -1) & uncertain_positive)).astype(np.float64)


def f1_stats(pred_bin: np.ndarray, ref_bin: np.ndarray) -> np.ndarray:
    """Per-sample ``[N, 3*14]`` = tp, fp, fn per condition (sums give corpus F1 of any subset)."""
    tp = pred_bin * ref_bin
    fp = pred_bin * (1 - ref_bin)
    fn = (1 - pred_bin) * ref_bin
    return np.concatenate([tp, fp, fn], axis=1)


def _f1_reducer(cols: list[int], average: str, C: int = len(CONDITIONS)):
    cols = np.asarray(cols)

    def reduce(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
        tp, fp, fn = sums[..., cols], sums[..., C + cols], sums[..., 2 * C + cols]
        with np.errstate(invalid="ignore", divide="ignore"):
            if average == "micro":
                T, D = tp.sum(-1), (2 * tp + fp + fn).sum(-1)
                v = np.where(D > 0, 2 * T / np.where(D > 0, D, 1), 0.0)
            else:  # macro, zero_division=0 as in sklearn's default for CheXbert reports
                d = 2 * tp + fp + fn
                v = np.where(d > 0, 2 * tp / np.where(d > 0, d, 1), 0.0).mean(-1)
        return np.where(np.asarray(n) > 0, 100.0 * v, np.nan)

    return reduce


def label_f1_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, prefix: str, meta: dict,
                     uncertain_positive: bool = False) -> dict[str, MetricStats]:
    """``{prefix}_micro_14, _macro_14, _micro_5, _macro_5`` from 14-condition label matrices (corpus metrics)."""
    stats = f1_stats(binarize(pred_labels, uncertain_positive), binarize(ref_labels, uncertain_positive))
    idx5 = [CONDITIONS.index(c) for c in CONDITIONS_5]
    out = {}
    for cols, tag in ((list(range(len(CONDITIONS))), "14"), (idx5, "5")):
        for avg in ("micro", "macro"):
            name = f"{prefix}_{avg}_{tag}"
            out[name] = MetricStats(name, stats, _f1_reducer(cols, avg), "corpus", None,
                                    dict(meta, average=avg, conditions=tag, uncertain="positive" if uncertain_positive else "negative"))
    return out


def keyword_f1_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, MetricStats]:
    """Rule-based CheXpert-style F1 (``keyword_f1_{micro,macro}_{14,5}``): an approximation, not CheXbert."""
    meta = {"package": "fairllava.metrics.chexpert_rules", "variant": "rule-based keyword+negation labeler "
            "(approximation of CheXpert labels; NOT CheXbert)", "scale": "percent", "level": "corpus"}
    return label_f1_metrics(label_reports(predictions), label_reports(references), "keyword_f1", meta)


# --- agreement with the IU X-ray MeSH tags (measures the approximation; no text is stored) ---------------

MESH_TO_CONDITION = {
    "normal": "No Finding", "Opacity": "Lung Opacity", "Airspace Disease": "Lung Opacity", "Infiltrate": "Lung Opacity",
    "Density": "Lung Opacity", "Cardiomegaly": "Cardiomegaly", "Pulmonary Atelectasis": "Atelectasis",
    "Pleural Effusion": "Pleural Effusion", "Catheters, Indwelling": "Support Devices",
    "Surgical Instruments": "Support Devices", "Implanted Medical Device": "Support Devices",
    "Tube, Inserted": "Support Devices", "Medical Device": "Support Devices", "Stents": "Support Devices",
    "Nodule": "Lung Lesion", "Mass": "Lung Lesion", "Fractures, Bone": "Fracture", "Pulmonary Edema": "Edema",
    "Pulmonary Congestion": "Edema", "Heart Failure": "Edema", "Pneumonia": "Pneumonia",
    "Consolidation": "Consolidation", "Pneumothorax": "Pneumothorax",
}


def iu_reports_path() -> str:
    """``NLMCXR_reports.tgz`` inside the installed torchxrayvision wheel (located, never imported)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("torchxrayvision wheel not installed (pip install --no-deps torchxrayvision)")
    return os.path.join(os.path.dirname(spec.origin), "data", "NLMCXR_reports.tgz")


def iu_mesh_agreement(tgz_path: str | None = None) -> dict:
    """Rule labels on FINDINGS + IMPRESSION vs conditions implied by the MeSH/major tags of IU X-ray reports.

    Only conditions reachable from MeSH (see ``MESH_TO_CONDITION``) are scored; reports tagged
    ``No Indexing`` or with neither section are skipped. Returns per-condition support/precision/recall/F1
    and micro/macro F1 (percent). Reads the licensed archive at run time; nothing is written.
    """
    import tarfile
    import xml.etree.ElementTree as ET

    conds = sorted(set(MESH_TO_CONDITION.values()), key=CONDITIONS.index)
    texts, truth = [], []
    with tarfile.open(tgz_path or iu_reports_path()) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            tags = [(m.text or "").split("/")[0].strip() for m in root.iter("major")]
            if not tags or "No Indexing" in tags:
                continue
            parts = [a.text or "" for a in root.iter("AbstractText") if a.get("Label") in ("FINDINGS", "IMPRESSION")]
            if not any(p.strip() for p in parts):
                continue
            texts.append(" ".join(parts))
            truth.append([float(any(MESH_TO_CONDITION.get(t) == c for t in tags)) for c in conds])
    pred = binarize(label_reports(texts))[:, [CONDITIONS.index(c) for c in conds]]
    ref = np.array(truth)
    per = {}
    for j, c in enumerate(conds):
        tp = float((pred[:, j] * ref[:, j]).sum())
        fp = float((pred[:, j] * (1 - ref[:, j])).sum())
        fn = float(((1 - pred[:, j]) * ref[:, j]).sum())
        per[c] = {"support": int(ref[:, j].sum()), "precision": 100 * tp / (tp + fp) if tp + fp else 0.0,
                  "recall": 100 * tp / (tp + fn) if tp + fn else 0.0, "f1": 200 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0}
    tp, fp, fn = (pred * ref).sum(), (pred * (1 - ref)).sum(), ((1 - pred) * ref).sum()
    return {"n_reports": len(texts), "conditions": per, "micro_f1": float(200 * tp / (2 * tp + fp + fn)),
            "macro_f1": float(np.mean([v["f1"] for v in per.values()]))}
