"""Strata for the conditional estimate I(a; z | s) when the task has no discrete label (report generation).

Why: ``mi_conditional`` stops the penalty from erasing attribute information that the *label* needs (the label
correlates with the attribute in training data). A report has no label, but its findings are one: we derive them
offline with the rule-based CheXpert labeller (``fairllava.metrics.chexpert_rules``, an approximation of the
CheXpert labeller, no model weights) from the **target** report of each training record, binarise them
(uncertain -> negative) and use the combination of ``mi_strata_findings`` as the stratum (default: "No Finding",
i.e. normal vs abnormal; every extra finding doubles the strata, so keep the list short for small batches:
strata with one sample in a micro-batch carry no weight). Only the labels are derived; no text is logged.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from ..errors import FairllavaError


def target_text(record: Mapping) -> str:
    """The record's answer turns (what the model is trained to generate), joined."""
    turns = record.get("conversations") or []
    return " ".join(str(t.get("value", "")) for t in turns if t.get("from") in ("gpt", "assistant"))


def chexpert_strata(records: Iterable[Mapping], findings: list[str]) -> dict[str, int]:
    """Record id -> stratum id (index of the sorted binarised-finding combinations present)."""
    from ..metrics.chexpert_rules import CONDITIONS, binarize, label_report

    cols = [CONDITIONS.index(f) for f in findings]
    keys: dict[str, tuple[int, ...]] = {}
    for r in records:
        text = target_text(r)
        if not text.strip():
            continue  # no target: unknown stratum (ignored by the estimate)
        lab = binarize(label_report(text)[None, :])[0]
        keys[str(r["id"])] = tuple(int(lab[c]) for c in cols)
    if not keys:
        raise FairllavaError("fairness.mi_strata_source=chexpert_rules: no training record has a target report to "
                             "derive findings from")
    combos = {k: i for i, k in enumerate(sorted(set(keys.values())))}
    return {rid: combos[k] for rid, k in keys.items()}
