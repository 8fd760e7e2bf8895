"""Can the DAC learn the shortcut attribute from the model's hidden states within a demo-length run?

A CLUB penalty is only as strong as its variational classifier: a DAC that stays at chance gives an estimate
of ~0 and no gradient, whatever lambda is. This diagnostic freezes the stage-1 model, collects image-token
hidden states of training samples at a few layers, and trains fresh DAC heads exactly as the regulariser
does (``FairnessRegularizer.dac_update``: batches of 8 samples, 100 steps) for each input treatment
(L2-normalised / raw / running standardisation) and learning rate; it prints the balanced accuracy on held-out
samples. Uses training data only (no test labels), so it can pick estimator settings without test-set selection.

    python bench/dac_learnability.py --data demo_out/data --projector demo_out/stage1/projector.safetensors
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def collect(data: Path, projector: Path | None, layers: list[int], n: int, system_prompt: str | None):
    import numpy as np
    import torch

    from fairllava.data.collator import VLMCollator
    from fairllava.data.dataset import VLMDataset
    from fairllava.data.preparers.shortcut import shortcut_vocabs
    from fairllava.demo import get_preset
    from fairllava.models.embedded import ensure_embedded_vlm
    from fairllava.models.hidden_states import HiddenStateCapture
    from fairllava.models.loading import image_token_id, load_vlm
    from fairllava.training.checkpoint import load_projector
    from fairllava.training.trainer import _active_projector

    model, proc = load_vlm(ensure_embedded_vlm(image_size=get_preset("full").image_size), dtype="float32")
    if projector is not None:
        load_projector(_active_projector(model), projector)
    vocabs = shortcut_vocabs()
    ds = VLMDataset(data / "train.jsonl", data / "images", vocabs)
    col = VLMCollator(proc, vocabs, "train", system_prompt=system_prompt)
    order = np.random.RandomState(0).permutation(len(ds))[:n]
    feats: dict[int, list] = {i: [] for i in layers}
    ys = []
    img_id = image_token_id(model)
    with torch.no_grad():
        for s in range(0, n, 16):
            b = col([ds[int(i)] for i in order[s:s + 16]])
            with HiddenStateCapture(model, layers) as cap:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                      use_cache=False)
            img = b["input_ids"] == img_id
            for i in layers:
                h = cap.states[i]
                feats[i].append(h[img].reshape(h.shape[0], -1, h.shape[-1]))
            ys.append(b["attr_labels"]["race"])
    return {i: torch.cat(v) for i, v in feats.items()}, torch.cat(ys)


def learnability(x, y, treatment: str, lr: float, pooling: str, n_train: int, steps: int = 100, bs: int = 8) -> float:
    """Balanced accuracy of a DAC trained like the regulariser's, on samples after ``n_train``."""
    import torch

    from fairllava.regularizer import FairnessConfig, FairnessRegularizer
    from fairllava.regularizer.pooling import pool

    cfg = FairnessConfig(attributes={"race": {"num_classes": 2}}, update_mode="alternating", mi_pooling=pooling,
                         mi_l2_normalize=treatment == "l2", mi_standardize=treatment == "standardized", seed=0)
    torch.manual_seed(0)
    reg = FairnessRegularizer(cfg, x.shape[-1])
    opt = torch.optim.AdamW(reg.param_groups(lr), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    mask_all = torch.ones(x.shape[:2], dtype=torch.bool)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (bs,), generator=g)
        z, rows = reg.pool([x[idx]], mask_all[idx])
        reg.dac_update(z, {"race": y[idx]}, opt, row_index=rows)
    reg.eval()
    zt, rows = pool([x[n_train:]], mask_all[n_train:], "token", cfg.l2_normalize)
    yt = y[n_train:][rows]
    with torch.no_grad():
        pred = reg.heads["race"](reg.standardize(zt)).argmax(-1)
    return float(torch.stack([(pred[yt == c] == c).float().mean() for c in (0, 1)]).mean())


def main() -> None:
    from fairllava.demo import get_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a rendered derm-vqa shortcut folder")
    ap.add_argument("--projector", type=Path, default=None, help="stage-1 projector.safetensors (default: random init)")
    ap.add_argument("--layers", default="0,8,15")
    ap.add_argument("--n", type=int, default=480, help="training samples used (the last 80 are held out)")
    a = ap.parse_args()
    layers = [int(v) for v in a.layers.split(",")]
    x, y = collect(a.data, a.projector, layers, a.n, get_preset("full").system_prompt)
    n_train = a.n - 80
    print(f"balanced accuracy of a linear DAC after 100 steps x 8 samples (chance 0.50), held-out {a.n - n_train}")
    print("| layer | pooling | lr | L2-normalised | raw | standardised |")
    print("|---|---|---|---|---|---|")
    for i in layers:
        for pooling in ("random_token", "token"):
            for lr in (2e-4, 1e-3, 1e-2):
                accs = [learnability(x[i], y, t, lr, pooling, n_train) for t in ("l2", "raw", "standardized")]
                print(f"| {i} | {pooling} | {lr:g} | " + " | ".join(f"{v:.2f}" for v in accs) + " |", flush=True)


if __name__ == "__main__":
    main()
