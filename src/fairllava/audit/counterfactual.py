"""Counterfactual matched pairs (EVALUATION.md §5.5) from one fixed image encoder shared by every compared model.

Why one fixed encoder: a paired comparison of two models needs the *same* pairs for both. Embedding the
images with each audited model's own features (its projector, its adapter) gives each model its own
pairs, so their counterfactual gaps are not comparable. The pairs therefore come from the frozen vision
tower of the base model (the same weights under every adapter) or from a named encoder, pooled over its
patches; offline there is no BiomedCLIP. Within buckets of identical clinical labels (the VQA class, or the
rule-based 14-finding labels of the reference report) samples of two groups are matched greedily by cosine
similarity, and each model's per-sample metric difference within the pairs is averaged with a bootstrap CI
over pairs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import FairllavaError
from ..io import atomic_write_json


def _vision_tower(model):
    """The image encoder of a LLaVA-style model (HF Llava, the embedded EfficientNet VLM, PEFT-wrapped or not)."""
    from ..models.loading import unwrap_model

    base = unwrap_model(model)
    for holder in (getattr(base, "model", None), base):
        if holder is None:
            continue
        try:
            tower = getattr(holder, "vision_tower")
        except AttributeError:
            continue
        if tower is not None:
            return tower
    raise FairllavaError(f"{type(base).__name__}: no vision tower found; pass an encoder with a vision tower")


def encoder_embeddings(encoder, processor, records: Sequence[dict], image_root: str | os.PathLike | None,
                       batch_size: int = 8) -> np.ndarray:
    """``[N, D]`` image embeddings: the encoder's vision tower output averaged over patches (no projector)."""
    import torch

    from ..data.collator import VLMCollator
    from ..data.dataset import VLMDataset

    missing = [r["id"] for r in records if not r.get("image")]
    if missing:
        raise FairllavaError(f"record id={missing[0]}: no image; counterfactual pairs are matched on images")
    tower = _vision_tower(encoder)
    dataset = VLMDataset(list(records), image_root, vocabs={})
    collator = VLMCollator(processor, vocabs={}, mode="generate")
    device = next(tower.parameters()).device
    dtype = next(tower.parameters()).dtype
    was_training = tower.training
    tower.eval()
    out = []
    try:
        with torch.no_grad():
            for lo in range(0, len(records), batch_size):
                batch = collator([dataset[i] for i in range(lo, min(len(records), lo + batch_size))])
                pv = batch["pixel_values"].to(device=device, dtype=dtype)
                if hasattr(tower, "extract_features"):  # EfficientNet: [B, C, h, w] feature map
                    z = tower.extract_features(pv).mean(dim=(2, 3))
                else:  # CLIP/SigLIP-style transformer: [B, patches, D]
                    z = tower(pixel_values=pv).last_hidden_state.mean(dim=1)
                out.append(z.float().cpu().numpy())
    finally:
        tower.train(was_training)
    return np.concatenate(out).astype(np.float64)


def run_counterfactual(encoder, processor, records: Sequence[dict], image_root: str | os.PathLike | None,
                       predictions: Sequence[dict] | str | os.PathLike | Mapping, out_dir: str | os.PathLike, *,
                       attribute: str, groups: tuple[str, str] | None = None, task: str = "vqa",
                       metrics: Sequence[str] | None = None, min_similarity: float = -1.0, n_boot: int = 1000,
                       seed: int = 0, batch_size: int = 8, name: str = "model", progress: bool = True,
                       overwrite: bool = False, encoder_name: str = "base model") -> dict:
    """Match pairs across ``groups`` of ``attribute`` with ``encoder``'s vision tower; score |Δ metric|.

    ``predictions``: one prediction file/rows (the model ``name``), or ``{name: file or rows}`` for several
    models, all scored on the *same* pairs (ids present in the records and in every file). ``encoder`` is the
    base model (its vision tower is frozen and shared by all adapters) or any model with a vision tower.
    ``min_similarity`` is a cosine threshold on the centred embeddings (-1 keeps every greedy match).
    Writes ``counterfactual.json``; with one model its gaps are under ``metrics`` (and ``models``).
    """
    from ..fairness.counterfactual import counterfactual_gap, match_pairs, report_label_keys
    from ..fairness.evaluate import build_metrics, load_predictions

    out = Path(out_dir)
    if (out / "counterfactual.json").exists() and not overwrite:
        raise FairllavaError(f"{out / 'counterfactual.json'}: already exists (pass --overwrite to replace it)")
    sets = dict(predictions) if isinstance(predictions, Mapping) else {name: predictions}
    if not sets:
        raise FairllavaError("counterfactual: no predictions given")
    loaded = {n: load_predictions(p, task) for n, p in sets.items()}
    by_id = {str(r["id"]): r for r in records}
    first = next(iter(loaded.values()))
    id_sets = [set(d.ids) for d in loaded.values()]
    common = [rid for rid in first.ids if rid in by_id and all(rid in ids for ids in id_sets)]
    if len(common) < 2:
        raise FairllavaError(f"{first.source}: fewer than 2 prediction ids are in the records (and every "
                             f"predictions file): {len(common)} of {first.n}; are they for this data file?")
    recs = [by_id[rid] for rid in common]
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
    aligned = {}
    for n, d in loaded.items():
        pos = {rid: i for i, rid in enumerate(d.ids)}
        aligned[n] = d.subset([pos[rid] for rid in common])

    if task == "vqa":
        keys = [str(r.get("label")).strip().upper() if r.get("label") is not None else None for r in recs]
    else:
        keys = report_label_keys(aligned[next(iter(aligned))].references)
    emb = encoder_embeddings(encoder, processor, recs, image_root, batch_size)
    emb = emb - emb.mean(axis=0, keepdims=True)  # cosine around the data mean, not dominated by it
    pairs = match_pairs(emb, values, keys, groups=tuple(groups), min_similarity=min_similarity)
    per_model, skipped = {}, {}
    for n, d in aligned.items():
        stats, skipped_n, _ = build_metrics(d, task, metrics)
        scores = {m: s.per_sample for m, s in stats.items() if s.per_sample is not None}
        if not scores:
            raise FairllavaError("counterfactual pairs need per-sample metrics; the chosen metrics are corpus-level only")
        per_model[n] = counterfactual_gap(scores, pairs, n_boot=n_boot, seed=seed, run="counterfactual",
                                          attribute=attribute)
        skipped.update(skipped_n)
    sims = np.array([p[2] for p in pairs]) if pairs else np.zeros(0)
    result = {
        "model": next(iter(per_model)) if len(per_model) == 1 else list(per_model),
        "task": task,
        "attribute": attribute,
        "groups": list(groups),
        "encoder": encoder_name,
        "embedding": "the encoder's vision tower output averaged over patches (no projector, no adapter), centred "
                     "on the data mean; the same pairs for every compared model",
        "bucket": "VQA label" if task == "vqa" else "rule-based 14-finding labels of the reference",
        "min_similarity": min_similarity,
        "n_samples": len(recs),
        "n_pairs": len(pairs),
        "similarity": {"mean": float(sims.mean()) if len(sims) else None,
                       "min": float(sims.min()) if len(sims) else None},
        "models": per_model,
        "skipped_metrics": skipped,
        "pairs": [{"a": common[i], "b": common[j], "cosine": round(c, 6)} for i, j, c in pairs],
        "n_boot": n_boot,
        "seed": seed,
    }
    if len(per_model) == 1:
        result["metrics"] = next(iter(per_model.values()))
    atomic_write_json(out / "counterfactual.json", result)
    return result
