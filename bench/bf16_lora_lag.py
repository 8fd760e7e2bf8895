"""Why bf16 lags fp32 in the first ten training steps (the loss-curve check of bench_training_step.py --curves).

Hypothesis: early in training LoRA's B is tiny, so a LoRA layer's update ``scale * B(A(x))`` is smaller than half a
bf16 ulp of the base output it is added to, and the bf16 sum rounds part of it away: the forward does not yet
see what the optimizer has learned. Test: the same runs with the fused LoRA forward (models/lora_fused.py) summing
in fp32 and returning fp32 (so the residual stream stays fp32 too), everything else unchanged.

Usage: python bench/bf16_lora_lag.py [--steps 30]   # loss curves fp32 / bf16 / bf16 + fp32 sum (seeds 0, 1),
       the curve tolerance of bench_training_step.py --curves applied to the fp32 sum, then step times
A diagnostic: the fp32 sum is monkeypatched here, it is not a library setting.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training_step as bts  # noqa: E402  (same data, model and settings as the loss-curve check)


def fp32_sum_forward(self, x, *args, **kwargs):
    import torch

    from fairllava.models import lora_fused

    if not lora_fused._covered(self, x, args, kwargs):
        return self._fairllava_peft_forward(x, *args, **kwargs)
    base = self.base_layer(x)
    xa = self._fairllava_group.lora_a(self, x)
    w = self.lora_B[lora_fused._ADAPTER].weight
    with torch.autocast("cpu", enabled=False):
        out = torch.addmm(base.reshape(-1, base.shape[-1]).float(), xa.reshape(-1, xa.shape[-1]).float(), w.t(),
                          alpha=float(self.scaling[lora_fused._ADAPTER]))
    return out.view(base.shape)


def curves(steps: int) -> None:
    from fairllava.models import lora_fused
    from fairllava.models.embedded import ensure_embedded_vlm

    data = bts._data(400, None)
    base = ensure_embedded_vlm(image_size=128, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="fairllava-lag-"))
    original = lora_fused._fused_forward
    runs = {}
    plan = (("fp32", "float32", False, 0), ("bf16", "auto", False, 0), ("bf16 + fp32 sum", "auto", True, 0),
            ("bf16 + fp32 sum, seed 1", "auto", True, 1))
    for name, dtype, patched, seed in plan:
        lora_fused._fused_forward = fp32_sum_forward if patched else original  # bound when the trainer fuses
        try:
            runs[name] = bts._train_curve(base, data, tmp / name.replace(" ", "").replace(",", ""), dtype, seed, steps)
        finally:
            lora_fused._fused_forward = original

    def windows(v: list[float]) -> list[float]:
        return [sum(v[i:i + 10]) / len(v[i:i + 10]) for i in range(0, len(v), 10)]

    for name, v in runs.items():
        print(f"{name:24s} steps 1-8: {' '.join(f'{x:.3f}' for x in v[:8])}   10-step window means: "
              f"{' '.join(f'{x:.3f}' for x in windows(v))}", flush=True)
    # bench_training_step.py --curves' pre-declared tolerance, applied to the fp32-sum variant
    wp = [abs(a - b) for a, b in zip(windows(runs["fp32"]), windows(runs["bf16 + fp32 sum"]))]
    ws = [abs(a - b) for a, b in zip(windows(runs["bf16 + fp32 sum"]), windows(runs["bf16 + fp32 sum, seed 1"]))]
    print(f"fp32 sum: max |fp32 - bf16+fp32 sum| (seed 0) = {max(wp):.4f}; max |seed 0 - seed 1| = {max(ws):.4f} -> "
          f"{'PASS' if max(wp) <= max(ws) else 'FAIL'}; per window: {' '.join(f'{a:.3f}/{b:.3f}' for a, b in zip(wp, ws))}")


def timing(rounds: int = 8) -> None:
    from fairllava.data.collator import VLMCollator
    from fairllava.data.dataset import VLMDataset
    from fairllava.data.preparers.shortcut import shortcut_vocabs
    from fairllava.models.embedded import ensure_embedded_vlm

    data = bts._data(64, None)
    base = ensure_embedded_vlm(image_size=128, seed=0)
    vocabs = shortcut_vocabs()
    ds = VLMDataset(data / "train.jsonl", data / "images", vocabs)
    items = [ds[i] for i in range(8)]
    built = {}
    for name in ("default", "fp32 sum"):
        mod, opt, proc, _ = bts.build(base, "auto", True, "lora", "auto", True)
        if name == "fp32 sum":
            for m in mod.modules():
                if hasattr(m, "_fairllava_group"):
                    m.forward = types.MethodType(fp32_sum_forward, m)
        batch = VLMCollator(proc, vocabs, "train", task_labels=sorted({r["label"] for r in ds.records}))(items)
        built[name] = (mod, opt, batch)
    times = {k: [] for k in built}
    for rep in range(rounds + 1):  # round-robin; the first round is discarded
        for name, (mod, opt, batch) in built.items():
            t = time.perf_counter()
            bts._step(mod, opt, batch)
            if rep:
                times[name].append(time.perf_counter() - t)
    r = [a / b for a, b in zip(times["fp32 sum"], times["default"])]
    print(" ".join(f"{k}: {statistics.median(v):.3f} s/step" for k, v in times.items()),
          f"-> fp32 sum x{statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    curves(a.steps)
    timing()
