"""How well does the `erasure` method's eraser guard the shortcut attribute on the embedded model's image features?

Collects the projector's input (EfficientNet-Lite0 feature-map tokens, the features the eraser is fitted on) for
the training split of a rendered derm-vqa shortcut folder, fits the eraser on a part of it (``--fit-frac``) exactly
as the trainer does (``ErasureStats``: every token a row, conditional = within task label), and trains fresh
class-balanced logistic probes of the attribute within each label, on mean-pooled tokens:
- in-sample fit: trained and scored on all fit samples (LEACE's guarantee: no linear probe beats a constant in
  balanced log loss there; printed as balanced accuracy / log-loss gain over the constant),
- in-sample CV: 5-fold CV on the fit samples (what a probe trained on some of them reads from the others),
- held-out CV: 5-fold CV on the remaining training samples (never seen by the fit).
Training data only: no test labels are read.

    python bench/erasure_probe.py --data /tmp/derm            # renders the folder first if it is missing
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def collect(data: Path, attribute: str, batch_size: int = 32):
    import torch

    from fairllava.data.collator import VLMCollator
    from fairllava.data.dataset import VLMDataset
    from fairllava.data.preparers.shortcut import shortcut_vocabs
    from fairllava.demo import get_preset
    from fairllava.erasure.fit import projector_inputs
    from fairllava.models.embedded import ensure_embedded_vlm
    from fairllava.models.loading import load_vlm

    preset = get_preset("full")
    model, proc = load_vlm(ensure_embedded_vlm(image_size=preset.image_size), dtype="float32")
    vocabs = shortcut_vocabs()
    ds = VLMDataset(data / "train.jsonl", data / "images", vocabs)
    col = VLMCollator(proc, vocabs, "train", system_prompt=preset.system_prompt)
    xs = []
    with torch.no_grad():
        for s in range(0, len(ds), batch_size):
            b = col([ds[i] for i in range(s, min(len(ds), s + batch_size))])
            xs.append(projector_inputs(model, {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}))
    labels = sorted({r["label"] for r in ds.records})
    y = torch.tensor([labels.index(r["label"]) for r in ds.records])
    a = torch.tensor([ids[attribute] for ids in ds.attr_ids])
    return torch.cat(xs).float(), y, a, labels


def probe(x, t) -> float:
    """5-fold CV balanced accuracy of a fresh class-balanced logistic probe (standardised features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(clf, x.numpy(), t.numpy(), cv=folds, scoring="balanced_accuracy").mean())


def probe_in_sample(x, t) -> str:
    """Balanced accuracy and balanced log-loss gain over the constant (nats) of a probe fit and scored on one set."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, log_loss

    X, t = x.double().numpy(), t.numpy()
    X = (X - X.mean(0)) / X.std(0).clip(1e-6)
    clf = LogisticRegression(max_iter=5000, class_weight="balanced").fit(X, t)
    w = np.where(t == 1, 0.5 / t.mean(), 0.5 / (1 - t.mean()))
    gain = np.log(2) - log_loss(t, clf.predict_proba(X), sample_weight=w)
    return f"{balanced_accuracy_score(t, clf.predict(X)):.2f} / {gain:.3f}"


def main() -> None:
    import torch

    from fairllava.erasure.fit import ErasureStats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=2400, help="training samples rendered when --data is missing")
    ap.add_argument("--attribute", default="race")
    ap.add_argument("--fit-frac", type=float, default=0.5)
    a = ap.parse_args()
    if not (a.data / "train.jsonl").is_file():
        from fairllava.benchmark.prepare import prepare_shortcut

        prepare_shortcut("derm-vqa", a.data, seed=0, n_train=a.n_train, evidence_probe=False, progress=False)
    cache = a.data / f"erasure_probe_{a.attribute}.pt"
    if cache.is_file():
        x, y, attr, labels = torch.load(cache, weights_only=True)
    else:
        x, y, attr, labels = collect(a.data, a.attribute)
        torch.save((x, y, attr, labels), cache)
    n, tokens, d = x.shape
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cut = int(a.fit_frac * n)
    fit_i, ho_i = perm[:cut], perm[cut:]
    print(f"{n} training samples x {tokens} tokens x {d} features; fit on {cut}, held out {n - cut}")
    erasers = {"none": None}
    for mode in ("conditional", "global"):
        strata = y if mode == "conditional" else torch.zeros_like(y)
        st = ErasureStats(d, {a.attribute: 2}, len(labels) if mode == "conditional" else 1)
        st.update(x[fit_i].reshape(-1, d), {a.attribute: attr[fit_i].repeat_interleave(tokens)},
                  strata[fit_i].repeat_interleave(tokens))
        erasers[mode] = st.eraser()
        print(f"{mode}: rank {erasers[mode].rank}, in-sample residual cross-covariance {st.residual(erasers[mode]):.2e}")
    cols = [f"{lab} (minority n={int(((y[idx] == j) & (attr[idx] == 1)).sum())})" for j, lab in enumerate(labels)
            for idx in (ho_i,)]
    print(f"\nbalanced accuracy of a fresh linear probe of {a.attribute!r} within each label (chance 0.50); "
          f"columns: label (dark-tone samples in the held-out part)")
    print("| eraser | part | " + " | ".join(cols) + " | label probe |")
    print("|---|---|" + "---|" * (len(labels) + 1))
    for name, e in erasers.items():
        feats = x if e is None else e(x)
        pooled = feats.mean(dim=1)
        for part, idx in (("in-sample fit", fit_i), ("in-sample CV", fit_i), ("held-out CV", ho_i)):
            accs = []
            for j in range(len(labels)):
                m = idx[y[idx] == j]
                ok = int((attr[m] == 1).sum()) >= 5 and int((attr[m] == 0).sum()) >= 5
                score = probe_in_sample if part == "in-sample fit" else (lambda f, t: f"{probe(f, t):.2f}")
                accs.append(score(pooled[m], attr[m]) if ok else "n/a")
            print(f"| {name} | {part} | " + " | ".join(accs) + f" | {probe(pooled[idx], y[idx]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
