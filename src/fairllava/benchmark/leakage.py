"""The benchmark's leakage audit: can a linear probe still read the shortcut attribute *within* each label?

Why within label: on this benchmark the tone is needed to read the lesion (its colour is rendered relative
to the background) and, under the shortcut, predicts the label in training. A marginal probe of the tone
therefore measures the task as much as the leakage; inside one label the tone carries no task information,
so what a probe reads there is the attribute itself. Probed at hidden-state index 0 (where the image enters
the LM) and at the layer the estimator regularises, on the evaluated split, with patient-level folds.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, read_jsonl


def audit_layers(plan, step, model) -> tuple[list[int], int]:
    """Resolved hidden-state indices for this run (``regularised`` -> the variant's own or the paper's layer)."""
    from ..models.hidden_states import decoder_layers
    from ..models.loading import unwrap_model
    from .configs import regularised_layer

    n_hs = len(decoder_layers(model).layers) + 1
    config = unwrap_model(model).config
    hidden = int(getattr(config, "text_config", config).hidden_size)
    reg = regularised_layer(plan, step.task, n_hs, hidden, step.variant)
    layers = sorted({reg if x == "regularised" else int(x) % n_hs for x in plan.audit.layers})
    return layers, reg


def run_leakage_audit(plan, step, model, processor, data: Path, records_path: Path, out: Path,
                      progress: bool = True) -> dict:
    """Write ``out/audit.json`` (marginal and within-label probe balanced accuracy per layer)."""
    from ..audit.audit import AuditConfig, audit_features
    from ..audit.features import FeatureConfig, FeatureSet, extract_features
    from ..audit.probes import ProbeConfig
    from .rendering import shortcut_vocabs

    if (out / "audit.json").is_file():
        return json.loads((out / "audit.json").read_text(encoding="utf-8"))
    records = read_jsonl(records_path)
    layers, reg = audit_layers(plan, step, model)
    gen = plan.tasks[step.task].generation
    fcfg = FeatureConfig(layers=layers, tokens="image", pooling="masked_mean", batch_size=gen.batch_size,
                         seed=step.seed, system_prompt=plan.system_prompt)
    vocabs = {plan.attribute: shortcut_vocabs()[plan.attribute]}
    feats = extract_features(model, processor, records, data / "images", out / "features", fcfg, vocabs=vocabs,
                             progress=progress, label=step.variant)
    cfg = AuditConfig(attributes=[plan.attribute], features=fcfg,
                      probe=ProbeConfig(folds=plan.audit.folds, seed=step.seed, n_boot=plan.audit.n_boot))

    def probe(idx: np.ndarray) -> dict[int, float]:
        sub = FeatureSet([feats.ids[i] for i in idx], feats.layers, {k: v[idx] for k, v in feats.X.items()})
        with warnings.catch_warnings():  # log(0) of a saturated probe's class probabilities: expected, not news
            warnings.simplefilter("ignore", RuntimeWarning)
            res = audit_features({"m": sub}, [records[i] for i in idx], cfg, vocabs=vocabs)
        rows = res["models"]["m"]["attributes"].get(plan.attribute, {}).get("per_layer", [])
        return {int(r["layer"]): 100.0 * r["balanced_accuracy"] for r in rows}

    marginal = probe(np.arange(len(records)))
    labels = sorted({str(r.get("label")) for r in records})
    per_label = {lab: probe(np.array([i for i, r in enumerate(records) if str(r.get("label")) == lab]))
                 for lab in labels}
    result = {"attribute": plan.attribute, "regularised_layer": reg, "layers": layers,
              "chance": 100.0 / len(vocabs[plan.attribute].classes), "folds": plan.audit.folds,
              "per_layer": {str(layer): {
                  "marginal": marginal.get(layer),
                  "within_label": float(np.mean([per_label[lab][layer] for lab in labels])),
                  "per_label": {lab: per_label[lab][layer] for lab in labels}} for layer in layers}}
    atomic_write_json(out / "audit.json", result)
    return result
