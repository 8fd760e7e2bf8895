"""Counterfactual matched pairs (EVALUATION.md §5.5) embedded with the audited model's own vision features.

Why the model's own features: offline there is no BiomedCLIP; the image features the model itself
splices into its language model (hidden-state index 0 at the image tokens) are what it "sees", so two
images close in that space are, for this model, near-identical inputs. Within buckets of identical
clinical labels (the VQA class, or the rule-based 14-finding labels of the reference report), samples
of two groups are matched greedily by cosine similarity, and the per-sample metric difference between
the two members of each pair is averaged with a bootstrap CI over pairs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FairllavaError
from ..io import atomic_write_json
from .features import FeatureConfig, extract_features


def run_counterfactual(model, processor, records: Sequence[dict], image_root: str | os.PathLike | None,
                       predictions: Sequence[dict] | str | os.PathLike, out_dir: str | os.PathLike, *,
                       attribute: str, groups: tuple[str, str] | None = None, task: str = "vqa",
                       metrics: Sequence[str] | None = None, min_similarity: float = -1.0, n_boot: int = 1000,
                       seed: int = 0, batch_size: int = 8, name: str = "model", progress: bool = True,
                       overwrite: bool = False) -> dict:
    """Match pairs across ``groups`` of ``attribute`` and score |Δ metric| of their predictions.

    ``min_similarity`` is a cosine threshold on the centred embeddings (-1 keeps every greedy match).
    ``records`` provide images (and ``label`` for VQA); ``predictions`` are the model's generated answers
    (prediction-file contract). Samples present in both are used. Writes ``counterfactual.json``.
    """
    from ..fairness.counterfactual import counterfactual_gap, match_pairs, report_label_keys
    from ..fairness.evaluate import build_metrics, load_predictions

    out = Path(out_dir)
    if (out / "counterfactual.json").exists() and not overwrite:
        raise FairllavaError(f"{out / 'counterfactual.json'}: already exists (pass --overwrite to replace it)")
    data = load_predictions(predictions, task)
    by_id = {str(r["id"]): r for r in records}
    keep = [i for i, rid in enumerate(data.ids) if rid in by_id]
    if len(keep) < 2:
        raise FairllavaError(f"{data.source}: fewer than 2 prediction ids are in the records "
                             f"({len(keep)} of {data.n}); are they for this data file?")
    data = data.subset(keep)
    recs = [by_id[rid] for rid in data.ids]
    values = [(r.get("attributes") or {}).get(attribute) for r in recs]
    present = sorted({str(v) for v in values if v is not None})
    if groups is None:
        if len(present) != 2:
            raise FairllavaError(f"attribute {attribute!r} has values {present}; choose two with --groups A,B")
        groups = (present[0], present[1])
    for g in groups:
        if g not in present:
            raise FairllavaError(f"--groups: {attribute}={g!r} does not occur in the data (values: {present})")
    values = [None if v is None else str(v) for v in values]

    if task == "vqa":
        keys = [str(r.get("label")).strip().upper() if r.get("label") is not None else None for r in recs]
    else:
        keys = report_label_keys(data.references)
    fs = extract_features(model, processor, recs, image_root, out / "features" / "vision",
                          FeatureConfig(layers=[0], tokens="image", pooling="masked_mean", batch_size=batch_size,
                                        seed=seed), progress=progress, label=f"{name} vision features")
    emb = fs.X[0].astype(np.float64)
    emb = emb - emb.mean(axis=0, keepdims=True)  # cosine around the data mean, not dominated by it
    pairs = match_pairs(emb, values, keys, groups=tuple(groups), min_similarity=min_similarity)
    stats, skipped, _ = build_metrics(data, task, metrics)
    scores = {m: s.per_sample for m, s in stats.items() if s.per_sample is not None}
    if not scores:
        raise FairllavaError("counterfactual pairs need per-sample metrics; the chosen metrics are corpus-level only")
    gaps = counterfactual_gap(scores, pairs, n_boot=n_boot, seed=seed, run=f"counterfactual:{name}",
                              attribute=attribute)
    sims = np.array([p[2] for p in pairs]) if pairs else np.zeros(0)
    result = {
        "model": name,
        "task": task,
        "attribute": attribute,
        "groups": list(groups),
        "embedding": "mean of the model's projected image features at its image tokens (hidden-state index 0), "
                     "centred on the data mean",
        "bucket": "VQA label" if task == "vqa" else "rule-based 14-finding labels of the reference",
        "min_similarity": min_similarity,
        "n_samples": len(recs),
        "n_pairs": len(pairs),
        "similarity": {"mean": float(sims.mean()) if len(sims) else None,
                       "min": float(sims.min()) if len(sims) else None},
        "metrics": gaps,
        "skipped_metrics": skipped,
        "pairs": [{"a": data.ids[i], "b": data.ids[j], "cosine": round(c, 6)} for i, j, c in pairs],
        "n_boot": n_boot,
        "seed": seed,
    }
    atomic_write_json(out / "counterfactual.json", result)
    return result
