"""Cost of the FairLLaVA regulariser: LoRA step time / memory with vs without it, and O(B·K) vs B×B CLUB.

Run: ``python bench/bench_regularizer.py`` (about a minute on 2 CPU cores). Each training variant runs in a
fresh subprocess so peak-RSS numbers do not leak between variants. Memory is reported two ways: the bytes
autograd saves for backward (exact, deterministic; the dominant training memory) and the growth of the
process peak RSS during the steps. Hidden states are captured with hooks (``HiddenStateCapture``); the
``output_hidden_states=True`` variant is shown for comparison only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("vanilla", "fair_hooks", "fair_output_hidden_states")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=16, projection_dim=64)
    text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=2000, max_position_embeddings=512)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=1999,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(model, lora)
    for p in model.base_model.model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    return model.train()


def make_batch(b: int = 4, n_text: int = 80, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 1990, (b, 4), generator=g), torch.full((b, 16), 1999),
                     torch.randint(3, 1990, (b, n_text), generator=g)], dim=1)
    labels = ids.clone()
    labels[:, :30] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(b, 3, 64, 64, generator=g),
        "labels": labels,
        "attr": {"race": torch.randint(0, 8, (b,), generator=g), "age_group": torch.randint(0, 3, (b,), generator=g),
                 "sex": torch.randint(0, 2, (b,), generator=g)},
    }


def run_variant(variant: str, steps: int, warmup: int) -> dict:
    import torch

    from fairllava import FairnessConfig, FairnessRegularizer
    from fairllava.models.hidden_states import HiddenStateCapture, decoder_layers, image_token_mask

    torch.set_num_threads(2)
    model = build_model()
    batch = make_batch()
    n_hs = len(decoder_layers(model).layers) + 1
    reg = FairnessRegularizer(FairnessConfig(), hidden_size=256)
    idx = reg.layer_indices(n_hs)
    params = [p for p in model.parameters() if p.requires_grad] + list(reg.heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    image_mask = image_token_mask(batch["input_ids"], model)
    saved_bytes: list[int] = []

    def step() -> None:
        seen: dict[int, int] = {}

        def pack(t):
            try:
                key = t.untyped_storage().data_ptr()
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            except RuntimeError:
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if variant == "vanilla":
                loss = model(**model_inputs).loss
            elif variant == "fair_hooks":
                with HiddenStateCapture(model, idx) as cap:
                    out = model(**model_inputs)
                mask = reg.select_tokens(batch["attention_mask"], image_mask)
                fair = reg(cap.get(), mask, batch["attr"])
                loss = out.loss + fair["loss"]
            else:
                out = model(**model_inputs, output_hidden_states=True)
                mask = reg.select_tokens(batch["attention_mask"], image_mask)
                fair = reg([out.hidden_states[i] for i in idx], mask, batch["attr"])
                loss = out.loss + fair["loss"]
        saved_bytes.append(sum(seen.values()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    rss_before = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "step_s": min(times),  # best-of-N: robust to other jobs on a shared machine
        "saved_mb": statistics.median(saved_bytes) / 2**20,
        "rss_growth_mb": max(peak_after, peak_before) - rss_before,
    }


def bench_estimator(sizes=(64, 256, 1024, 4096), k: int = 8, reps: int = 7) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from fairllava import club_mi

    def explicit(logits, labels):
        lp = F.log_softmax(logits.float(), dim=-1)
        mat = lp[:, labels]  # [B, B]
        b = labels.shape[0]
        pos = mat.diagonal().mean()
        return pos - (mat.sum() - mat.diagonal().sum()) / (b * (b - 1))

    rows = []
    g = torch.Generator().manual_seed(0)
    for b in sizes:
        logits = torch.randn(b, k, generator=g).requires_grad_(True)
        labels = torch.randint(0, k, (b,), generator=g)
        res = {"B": b}
        for name, fn in (("club_mi", club_mi), ("explicit_BxB", explicit)):
            fn(logits, labels).backward()  # warm-up
            ts = []
            for _ in range(reps):
                logits.grad = None
                t0 = time.perf_counter()
                fn(logits, labels).backward()
                ts.append(time.perf_counter() - t0)
            res[name] = min(ts) * 1e3
        res["diff"] = abs(club_mi(logits, labels).item() - explicit(logits, labels).item())
        res["bxb_mb"] = b * b * 4 / 2**20
        rows.append(res)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup)))
        return

    t_start = time.time()
    print("LoRA step on a tiny LLaVA (Llama 4x256, LoRA r16 on all LM projections, batch 4 x 100 tokens, "
          "3 attributes, random_token pooling at hidden-state index 2); step time = best of N")
    results = {}
    for v in VARIANTS:
        print(f"  running {v} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--variant", v, "--steps", str(args.steps),
                               "--warmup", str(args.warmup)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"variant {v} failed:\n{proc.stderr[-2000:]}")
        results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["vanilla"]
    print(f"{'variant':28s} {'step s':>8s} {'x time':>7s} {'saved MB':>9s} {'x mem':>6s} {'RSS +MB':>8s}")
    for v, r in results.items():
        print(f"{v:28s} {r['step_s']:8.3f} {r['step_s'] / base['step_s']:7.3f} {r['saved_mb']:9.1f} "
              f"{r['saved_mb'] / base['saved_mb']:6.3f} {r['rss_growth_mb']:8.1f}")
    print()
    print("CLUB estimator, forward+backward, K=8 (ms, best of 7)")
    print(f"{'B':>6s} {'O(B·K)':>9s} {'B×B':>9s} {'speed-up':>9s} {'B×B MB':>8s} {'|diff|':>9s}")
    for r in bench_estimator():
        print(f"{r['B']:6d} {r['club_mi']:9.3f} {r['explicit_BxB']:9.3f} {r['explicit_BxB'] / r['club_mi']:9.1f} "
              f"{r['bxb_mb']:8.1f} {r['diff']:9.2e}")
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
