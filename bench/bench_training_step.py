"""Training-step time on the demo's model: LM-head logits at every position vs only where the loss reads them.

Usage: python bench/bench_training_step.py [--steps 6] [--batch-size 8]
Needs the embedded VLM (built by `make demo` / `fairllava demo`, or built here from the offline wheels) and the
demo's rendered data (rendered into a temp folder if absent). The settings are measured interleaved (round-robin
over repeats) so machine load affects them alike; prints median seconds per forward+backward, the speed-up over
full logits, and checks that compact logits give the same loss (dropout off).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run(steps: int = 6, batch_size: int = 8, data_dir: str | None = None) -> dict:
    import torch

    from fairllava.data.collator import VLMCollator
    from fairllava.data.dataset import VLMDataset
    from fairllava.data.preparers.shortcut import prepare_shortcut, shortcut_vocabs
    from fairllava.demo import get_preset
    from fairllava.models.embedded import ensure_embedded_vlm
    from fairllava.models.loading import LoraSettings, apply_lora, load_vlm
    from fairllava.training.methods import LoraMethod
    from fairllava.training.trainer import TrainingModule

    p = get_preset("default")
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="fairllava-bench-")) / "data"
        prepare_shortcut(p.task, data_dir, seed=0, strength=p.strength, n_train=64, n_val_per_cell=1,
                         n_test_per_cell=1, image_size=p.image_size, evidence_probe=False, progress=False)
    data_dir = Path(data_dir)
    model, proc = load_vlm(ensure_embedded_vlm(image_size=p.image_size, seed=0), dtype="float32")
    model = apply_lora(model, LoraSettings(**p.lora))
    model.train()
    vocabs = shortcut_vocabs()
    ds = VLMDataset(data_dir / "train.jsonl", data_dir / "images", vocabs)
    items = [ds[i] for i in range(batch_size)]
    settings = {"full logits": False, "compact logits": True}
    batch = VLMCollator(proc, vocabs, "train", system_prompt=p.system_prompt)(items)
    modules = {k: TrainingModule(model, LoraMethod(), [], compact_logits=c) for k, c in settings.items()}
    times: dict[str, list[float]] = {k: [] for k in settings}
    for rep in range(steps + 1):  # the first round warms up and is discarded
        for k in settings:
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            loss, _, _ = modules[k](batch, 0.0, 0)
            loss.backward()
            if rep:
                times[k].append(time.perf_counter() - t)
    first = next(iter(settings))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"threads={torch.get_num_threads()}  batch={batch_size}  steps={steps}")
    for k in settings:
        print(f"{k:16s} T={batch['input_ids'].shape[1]:3d}  {med[k]:6.2f} s/step  x{med[first] / med[k]:.2f}")
    # dropout differs between calls, so compare losses with dropout off
    model.eval()
    with torch.no_grad():
        a = modules["full logits"](batch, 0.0, 0)[0]
        b = modules["compact logits"](batch, 0.0, 0)[0]
    print(f"eval-mode loss: full {float(a):.6f}  compact {float(b):.6f}  |diff| {abs(float(a - b)):.2e}")
    return {"median_seconds": med, "loss_diff": abs(float(a - b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", default=None, help="a rendered shortcut folder (default: render 64 images to a temp dir)")
    a = ap.parse_args()
    run(a.steps, a.batch_size, a.data)


if __name__ == "__main__":
    main()
