"""Stage-2 step time on the demo model: fp32 vs the default precision, the distance to this CPU's bf16 limit, and
the regulariser's overhead (time and memory) — measured interleaved in one run.

Usage:
  python bench/bench_training_step.py [--steps 6] [--batch-size 8]      # step times, FLOP limit, overhead
  python bench/bench_training_step.py --curves 100 --out docs/results/precision_curves.json
                                                                        # 100-step loss curves, fp32 vs default

Settings are built exactly as the trainer builds them (models/precision.py, models/lora_dropout.py,
TrainingModule) and timed round-robin (one step of each per round; the first round is discarded), so machine load
hits them alike. A step is forward + backward + AdamW step on the trainable weights.

- "fp32, PEFT dropout" is the step before this work: fp32 weights, one Bernoulli mask per LoRA layer.
- "fp32_sum none" is the default before ``lora.fp32_sum`` (2026-12-03): the LoRA sums in bf16; the default now adds
  them in fp32 (bench/bf16_lora_lag.py for why), and its cost in time and step memory is printed.
- The limit: the step's matmul FLOPs (torch's FlopCounterMode: mm/bmm/addmm/conv/SDPA, forward and backward)
  divided by this machine's measured matmul rate in the default compute dtype (a 2048^3 mm at the same thread
  count): bf16 where the CPU has bf16 matmul, else fp32 (an emulated bf16 mm there runs at < 1 GFLOP/s).
- On a CPU without bf16 matmul, ``auto`` is fp32, so the rows are labelled by what ``auto`` resolved to, and the
  fp32 "before" setting is timed twice: the two rows differ only by noise.
- Ratios are the median [min, max] of per-round paired ratios, so the noise of a shared VM is visible.
- Memory on a CPU has no allocator peak counter, so "step memory" is what differs between methods: the bytes
  saved for backward (deduplicated by storage, via saved-tensor hooks) plus trainable weights, gradients and
  AdamW state (method heads included). Frozen weights are the same for every method and left out.

--curves trains N real steps (FairTrainer, demo stage-2 settings) three times: fp32 seed 0, default seed 0,
default seed 1. Same-seed runs share the data order and the dropout masks (the mask bits do not depend on the
dtype), so fp32-vs-default isolates precision; seed 0-vs-1 is the run-to-run variation every claim already lives
with. The tolerance: the precision difference of 10-step window means must not exceed the seed difference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def _data(n_train: int, data_dir: str | None) -> Path:
    from fairllava.data.preparers.shortcut import prepare_shortcut

    if data_dir is not None and (Path(data_dir) / "train.jsonl").is_file():
        return Path(data_dir)
    out = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="fairllava-bench-")) / "data"
    prepare_shortcut("derm-vqa", out, seed=0, strength=1.0, n_train=n_train, n_val_per_cell=1, n_test_per_cell=1,
                     image_size=128, evidence_probe=False, progress=False,
                     overwrite=out.exists() and not any(out.iterdir()))
    return out


def _demo_fairness() -> dict:
    """The demo's fairllava estimator: the paper's block with the demo's overrides (index 0, conditional)."""
    from fairllava.benchmark.configs import paper_fairness
    from fairllava.demo import DEMO_FAIRNESS_OVERRIDES

    return {**paper_fairness("race"), **DEMO_FAIRNESS_OVERRIDES}


def build(base: Path, dtype: str, shared_dropout: bool, method: str = "lora", attn: str | None = None,
          fused: bool = True, fp32_sum: str | None = None):
    """(model, TrainingModule, optimizer) laid out like FairTrainer._load does it."""
    import torch

    from fairllava.models.loading import LoraSettings, apply_lora, load_vlm
    from fairllava.models.precision import prepare_for_training, resolve_dtype, store_in_compute_dtype
    from fairllava.training.methods import FairLLaVAMethod, LoraMethod
    from fairllava.training.trainer import TrainingModule, _active_projector, _hidden_size, _n_hidden_states

    cdt = resolve_dtype(dtype, "cpu")
    model, proc = load_vlm(base, dtype="checkpoint")
    from fairllava.models.precision import training_attention

    attn = training_attention(attn or "auto", "cpu")
    if attn:
        model.set_attn_implementation(attn)
    store_in_compute_dtype(model, cdt, keep_fp32=_active_projector(model))
    extra = {} if fp32_sum is None else {"fp32_sum": fp32_sum}  # None: the library default
    model = apply_lora(model, LoraSettings(**LORA, shared_dropout=shared_dropout, fused_forward=fused, **extra))
    prepare_for_training(model, cdt)
    model.train()
    if method == "lora":
        m = LoraMethod()
    else:
        from fairllava.regularizer import FairnessConfig, FairnessRegularizer

        fc = FairnessConfig.from_dict(_demo_fairness())
        m = FairLLaVAMethod(FairnessRegularizer(fc, hidden_size=_hidden_size(model)), fc)
    mod = TrainingModule(model, m, m.hidden_indices(_n_hidden_states(model)), compact_logits=True, compute_dtype=cdt)
    params = [p for p in mod.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return mod, opt, proc, cdt


def _step(mod, opt, batch) -> float:
    opt.zero_grad(set_to_none=True)
    loss, _, _ = mod(batch, 0.0, 0)
    loss.backward()
    opt.step()
    return float(loss.detach())


def step_memory(mod, opt, batch) -> int:
    """Bytes saved for backward (by storage) + trainable weights, grads and AdamW state."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except RuntimeError:
            pass
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = mod(batch, 0.0, 0)
    loss.backward()
    opt.step()
    trainable = sum(p.numel() * p.element_size() * 2 for p in mod.parameters() if p.requires_grad)  # weight + grad
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return sum(seen.values()) + trainable + state


def matmul_flops(mod, opt, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        _step(mod, opt, batch)
    return float(fc.get_total_flops())


def matmul_rate(dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n^3 mm in ``dtype`` at the current thread count (median of reps)."""
    import torch

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts)


def ratio_spread(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and range of the per-round ratios num[r] / den[r].

    Rounds interleave the settings, so one round's two steps met the same machine load; the spread of these
    paired ratios is what this run can tell apart (a shared VM drifts by tens of percent between rounds)."""
    r = sorted(a / b for a, b in zip(num, den))
    return statistics.median(r), r[0], r[-1]


def run(steps: int = 6, batch_size: int = 8, data_dir: str | None = None, attn_variants: bool = True) -> dict:
    import torch

    from fairllava.data.collator import VLMCollator
    from fairllava.data.dataset import VLMDataset
    from fairllava.data.preparers.shortcut import shortcut_vocabs
    from fairllava.models.embedded import ensure_embedded_vlm

    data = _data(64, data_dir)
    base = ensure_embedded_vlm(image_size=128, seed=0)
    vocabs = shortcut_vocabs()
    ds = VLMDataset(data / "train.jsonl", data / "images", vocabs)
    items = [ds[i] for i in range(batch_size)]
    import fairllava.models.precision as precision

    auto = "bf16" if precision.resolve_dtype("auto", "cpu") == torch.bfloat16 else "fp32"
    # On a CPU without bf16, auto is fp32 and the second row would repeat the first: it is then timed as a noise check.
    second = "bf16, PEFT dropout, sdpa" if auto == "bf16" else "fp32, PEFT dropout, sdpa (repeat: noise)"
    # name: (dtype, shared dropout, method, attention, fused LoRA forward, lora.fp32_sum; None = the default)
    variants = {
        "fp32, PEFT dropout, sdpa (before)": ("float32", False, "lora", "sdpa", False, None),
        second: ("auto", False, "lora", "sdpa", False, None),
        f"{auto}, shared dropout, sdpa": ("auto", True, "lora", "sdpa", False, None),
        f"{auto}, shared dropout, eager": ("auto", True, "lora", "auto", False, None),
        f"{auto}, shared, eager, fused, fp32_sum none": ("auto", True, "lora", "auto", True, "none"),
        f"default (auto: {auto}, shared, eager, fused, fp32_sum)": ("auto", True, "lora", "auto", True, None),
        "default, fairllava (demo estimator)": ("auto", True, "fairllava", "auto", True, None),
    }
    if attn_variants:
        variants["fp32, PEFT dropout, eager"] = ("float32", False, "lora", "eager", False, None)
    built = {}
    for name, (dt, shared, method, attn, fused, fp32_sum) in variants.items():
        mod, opt, proc, cdt = build(base, dt, shared, method, attn, fused, fp32_sum)
        batch = VLMCollator(proc, vocabs, "train", task_labels=sorted({r["label"] for r in ds.records}))(items)
        built[name] = (mod, opt, batch, cdt)
    times: dict[str, list[float]] = {k: [] for k in built}
    for rep in range(steps + 1):
        for name, (mod, opt, batch, _) in built.items():
            t = time.perf_counter()
            _step(mod, opt, batch)
            if rep:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    before_key = "fp32, PEFT dropout, sdpa (before)"
    before = med[before_key]
    default = f"default (auto: {auto}, shared, eager, fused, fp32_sum)"
    old_default = f"{auto}, shared, eager, fused, fp32_sum none"
    fair = "default, fairllava (demo estimator)"
    T = built[default][2]["input_ids"].shape[1]
    print(f"threads={torch.get_num_threads()}  batch={batch_size}  T={T}  rounds={steps}  "
          f"default dtype={built[default][3]}  (ratios: median [min, max] of the per-round paired ratios)")
    speedups = {}
    for k in built:
        speedups[k] = ratio_spread(times[before_key], times[k])
        m, lo, hi = speedups[k]
        print(f"{k:54s} {med[k]:6.3f} s/step   x{m:.2f} [{lo:.2f}, {hi:.2f}] vs fp32")
    flops = matmul_flops(*built[default][:3])
    cdt = built[default][3]
    rate = matmul_rate(cdt)
    limit = flops / rate
    name = "bf16" if cdt == torch.bfloat16 else "fp32"
    note = "" if name == "bf16" else " (no bf16 matmul on this CPU, so its limit is the fp32 rate)"
    print(f"matmul FLOPs per step {flops / 1e9:.1f} GFLOP; {name} mm rate here {rate / 1e9:.1f} GFLOP/s -> limit "
          f"{limit:.3f} s/step; default step is {med[default] / limit:.1f}x the limit{note}")
    mem = {k: step_memory(*built[k][:3]) for k in (default, fair, old_default)}
    cost, clo, chi = ratio_spread(times[default], times[old_default])
    print(f"lora.fp32_sum (default all vs none): time x{cost:.3f} [{clo:.3f}, {chi:.3f}]  step memory "
          f"{mem[old_default] / 2**20:.0f} -> {mem[default] / 2**20:.0f} MiB (x{mem[default] / mem[old_default]:.3f})")
    over, olo, ohi = ratio_spread(times[fair], times[default])
    print(f"regulariser overhead: time x{over:.3f} [{olo:.3f}, {ohi:.3f}]  step memory "
          f"{mem[default] / 2**20:.0f} -> {mem[fair] / 2**20:.0f} MiB (x{mem[fair] / mem[default]:.3f})")
    return {"median_seconds": med, "seconds": times, "default_dtype": name,
            "speedup_vs_fp32": speedups[default][0], "speedup_vs_fp32_range": list(speedups[default][1:]),
            "flops": flops, "matmul_rate": rate, "matmul_rate_dtype": name, "limit_seconds": limit,
            "overhead_time": over, "overhead_time_range": [olo, ohi],
            "overhead_memory": mem[fair] / mem[default], "fp32_sum_time": cost, "fp32_sum_time_range": [clo, chi],
            "fp32_sum_memory": mem[default] / mem[old_default], "threads": torch.get_num_threads(), "T": int(T)}


# ----------------------------------------------------------------------------- loss curves
def _train_curve(base: Path, data: Path, out: Path, dtype: str, seed: int, steps: int,
                 fp32_sum: str | None = None) -> list[float]:
    from fairllava.benchmark.rendering import VOCAB_CONFIG
    from fairllava.training.config import TrainConfig
    from fairllava.training.logging import read_metrics
    from fairllava.training.trainer import FairTrainer

    cfg = TrainConfig.from_dict({
        "model": {"path": str(base), "dtype": dtype},
        "data": {"train": str(data / "train.jsonl"), "image_root": str(data / "images"),
                 "attributes": {"race": VOCAB_CONFIG["race"]}, "max_length": 512},
        "output_dir": str(out), "stage": 2, "method": "lora",
        "lora": dict(LORA, **({} if fp32_sum is None else {"fp32_sum": fp32_sum})),
        "optim": {"lr": 2e-4, "per_device_batch_size": 8, "grad_accum": 1, "max_steps": steps, "seed": seed,
                  "warmup_ratio": 0.03},
        "checkpointing": {"every_n_steps": steps, "keep_last": 1},
        "logging": {"every_n_steps": 1, "tensorboard": False, "progress": False},
    })
    FairTrainer(cfg).train()
    return [r["lm_loss"] for r in read_metrics(out) if "lm_loss" in r]


def curves(steps: int, out_json: str | None, data_dir: str | None) -> dict:
    from fairllava.io import atomic_write_json
    from fairllava.models.embedded import ensure_embedded_vlm

    data = _data(400, data_dir)
    base = ensure_embedded_vlm(image_size=128, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="fairllava-curves-"))
    import torch

    from fairllava.models.precision import resolve_dtype

    native_bf16 = resolve_dtype("auto", "cpu") == torch.bfloat16
    # Without bf16 matmul, auto is fp32: default seed 0 would repeat fp32 seed 0 bit for bit on this machine, so
    # the precision comparison is empty here and the run measures fp32's own seed-to-seed variation instead.
    plan = ((("fp32_s0", "float32", 0), ("default_s0", "auto", 0), ("default_s1", "auto", 1)) if native_bf16
            else (("fp32_s0", "float32", 0), ("fp32_s1", "float32", 1)))
    runs = {}
    for name, dtype, seed in plan:
        t = time.perf_counter()
        runs[name] = _train_curve(base, data, tmp / name, dtype, seed, steps)
        print(f"{name}: {steps} steps in {time.perf_counter() - t:.0f} s, final loss {runs[name][-1]:.4f}", flush=True)

    def windows(x: list[float], w: int = 10) -> list[float]:
        return [sum(x[i:i + w]) / len(x[i:i + w]) for i in range(0, len(x), w)]

    res = {"steps": steps, "losses": runs, "default_dtype": "bf16" if native_bf16 else "fp32",
           "window_means": {k: windows(v) for k, v in runs.items()}}
    if not native_bf16:
        ws = [abs(a - b) for a, b in zip(windows(runs["fp32_s0"]), windows(runs["fp32_s1"]))]
        print(f"no bf16 matmul on this CPU (auto = fp32): no precision comparison; max |seed 0 - seed 1| (fp32) of "
              f"10-step window means = {max(ws):.4f}; per window: {' '.join(f'{w:.3f}' for w in ws)}")
        res.update({"window_abs_diff_seed_fp32": ws, "pass": None})
    else:
        wp = [abs(a - b) for a, b in zip(windows(runs["fp32_s0"]), windows(runs["default_s0"]))]
        ws = [abs(a - b) for a, b in zip(windows(runs["default_s0"]), windows(runs["default_s1"]))]
        ok = max(wp) <= max(ws)
        print(f"10-step window means: max |fp32 - default| (same seed) = {max(wp):.4f}; "
              f"max |seed 0 - seed 1| (default) = {max(ws):.4f} -> {'PASS' if ok else 'FAIL'} "
              "(precision must not move the curve more than a seed does)")
        res.update({"window_abs_diff_precision": wp, "window_abs_diff_seed": ws, "pass": ok})
    if out_json:
        atomic_write_json(out_json, res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed rounds (one step of every setting each)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", default=None, help="a rendered shortcut folder (default: render into a temp dir)")
    ap.add_argument("--no-attn-variant", action="store_true", help="skip the fp32-with-eager-attention setting")
    ap.add_argument("--curves", type=int, default=0, help="train N-step loss curves instead (fp32 vs default)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    a = ap.parse_args()
    if a.curves:
        curves(a.curves, a.out, a.data)
        return
    res = run(a.steps, a.batch_size, a.data, attn_variants=not a.no_attn_variant)
    if a.out:
        from fairllava.io import atomic_write_json

        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
