"""Batched (left-padded, KV cache) vs one-by-one greedy generation throughput on the same model.

Usage: python bench/bench_generation.py [--model DIR] [--n 32] [--batch-size 16] [--max-new-tokens 32]
Default model: the tiny random LLaVA (offline, seconds). Prints tokens/s side by side and the ratio
(target >= 4x) and checks that both runs wrote identical predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _records(folder: Path, n: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    rows = []
    for i in range(n):
        Image.fromarray((rng.rand(48, 48, 3) * 255).astype("uint8")).save(images / f"{i}.png")
        q = "Describe the findings" + " in the chest" * (i % 3) + "."
        rows.append({"id": f"b{i}", "group_id": f"g{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": "ok"}],
                     "attributes": {"sex": "F" if i % 2 else "M"}})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, images


def run(model_dir: str | None = None, n: int = 32, batch_size: int = 16, max_new_tokens: int = 32) -> dict:
    import torch

    from fairllava.generation import generate_predictions
    from fairllava.models.loading import load_vlm
    from fairllava.models.tiny import build_tiny_llava

    if model_dir:
        model, processor = load_vlm(model_dir, dtype="float32")
    else:
        model, processor = build_tiny_llava(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, images = _records(tmp, n)
        # warm-up (first-call overheads are not generation speed)
        generate_predictions(model, processor, data, tmp / "warm.jsonl", image_root=images, batch_size=batch_size,
                             max_new_tokens=2, progress=False)
        res = {}
        for name, bs in (("bs=1", 1), (f"bs={batch_size}", batch_size)):
            t0 = time.perf_counter()
            r = generate_predictions(model, processor, data, tmp / f"{bs}.jsonl", image_root=images, batch_size=bs,
                                     max_new_tokens=max_new_tokens, progress=False, resume=False)
            dt = time.perf_counter() - t0
            res[name] = {"tokens": r.new_tokens, "seconds": dt, "tokens_per_s": r.new_tokens / dt}
        same = (tmp / "1.jsonl").read_text() == (tmp / f"{batch_size}.jsonl").read_text()
    res["ratio"] = res[f"bs={batch_size}"]["tokens_per_s"] / res["bs=1"]["tokens_per_s"]
    res["identical_outputs"] = same
    res["threads"] = torch.get_num_threads()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: tiny random LLaVA)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    res = run(a.model, a.n, a.batch_size, a.max_new_tokens)
    b = f"bs={a.batch_size}"
    print(f"generation throughput ({a.model or 'tiny random LLaVA'}, {a.n} prompts, {a.max_new_tokens} new tokens, "
          f"{res['threads']} threads)")
    print(f"{'':10s}{'tokens':>10s}{'seconds':>10s}{'tokens/s':>12s}")
    for k in ("bs=1", b):
        r = res[k]
        print(f"{k:10s}{r['tokens']:>10d}{r['seconds']:>10.2f}{r['tokens_per_s']:>12.1f}")
    print(f"batched / one-by-one speed ratio: {res['ratio']:.1f}x (target >= 4x); "
          f"identical outputs: {res['identical_outputs']}")
    return 0 if res["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
