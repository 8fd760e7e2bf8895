"""The end-to-end demo: shortcut benchmark -> stage 1 -> vanilla LoRA vs FairLLaVA -> generate -> evaluate -> report.

Why this shape: it is the smallest experiment that can show the method *working or not* on this machine
(no GPU, no internet, no credentialed data). Every number in the report comes from the run's own
prediction files; each step writes into its own folder and is skipped when already complete, so a killed
demo resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import FairllavaError
from .io import atomic_write_json, atomic_write_text

DEMO_METHODS = ("lora", "fairllava")
SHORTCUT_ATTRIBUTE = "race"  # the benchmark's shortcut attribute (skin tone rendered as background)


@dataclass
class DemoPreset:
    """Everything that defines a demo run; saved as ``demo.json`` so a result names its settings."""

    name: str
    model: str  # "embedded" (real offline parts) | "tiny" (random, for CI)
    task: str = "derm-vqa"
    strength: float = 1.0
    n_train: int = 1200
    n_test_per_cell: int = 50
    n_val_per_cell: int = 10
    image_size: int = 128
    stage1: dict = field(default_factory=dict)  # optim overrides for stage 1
    stage2: dict = field(default_factory=dict)  # optim overrides for stage 2 (both methods)
    lora: dict = field(default_factory=lambda: {"r": 16, "alpha": 32, "dropout": 0.05})
    fairness: dict = field(default_factory=dict)  # FairnessConfig dict for the fairllava run
    max_new_tokens: int = 8
    gen_batch_size: int = 16
    n_boot: int = 1000
    n_min: int = 20
    audit_layers: Optional[list] = None  # hidden-state indices probed by the leakage audit (None = all)
    est_minutes: float = 15.0
    system_prompt: Optional[str] = None  # None = the chat template's default; training, generation and audit share it


# The paper/reference estimator (METHOD.md §4–6, the `mimic_cxr` preset's settings) on the benchmark's shortcut
# attribute: hidden-state index int(0.5 * n_hs), one random image token per sample, L2-normalised, linear DAC at
# the LoRA lr, unconditional, smooth |I|. On this model its DAC never leaves chance, so the penalty is ~0
# (docs/benchmark.md); the ablation harness applies its variants on top of this block.
REFERENCE_FAIRNESS = {
    "attributes": {SHORTCUT_ATTRIBUTE: {"num_classes": 2, "weight": 1.0}},
    "fairness_lambda": 1.0,
    "dac_loss_weight": 1.0,
    "ce_loss_weight": 1.0,
    "mi_layer_frac": 0.5,
    "mi_layer_index": None,
    "mi_token_mode": "image",
    "mi_pooling": "random_token",
    "mi_l2_normalize": None,
    "mi_standardize": False,
    "dac_lr": None,
    "mi_conditional": False,
    "mi_penalty": "smooth_abs",
    "update_mode": "joint",
    "seed": 42,
}

# What the demo runs: the same loss (lambda 1, joint updates, linear DAC), with the estimator settings that made
# the penalty act on this benchmark without levelling down (`std_token0_cond` in docs/benchmark.md; chosen on
# seed 0, checked on seed 1): every image token where it enters the LM (index 0), standardised instead of
# L2-normalised so the DAC can learn, DAC lr 1e-2, and the label-conditional estimate I(race; z | lesion label),
# which penalises only tone information beyond what the lesion itself explains.
DEMO_FAIRNESS_OVERRIDES = {
    "mi_layer_index": 0,
    "mi_pooling": "token",
    "mi_l2_normalize": False,
    "mi_standardize": True,
    "dac_lr": 0.01,
    "mi_conditional": True,
}
_DEMO_FAIRNESS = {**REFERENCE_FAIRNESS, **DEMO_FAIRNESS_OVERRIDES}

PRESETS: dict[str, DemoPreset] = {
    "default": DemoPreset(
        name="default",
        model="embedded",
        stage1={"lr": 1e-3, "per_device_batch_size": 8, "max_steps": 30},
        stage2={"lr": 2e-4, "per_device_batch_size": 8, "max_steps": 100},
        fairness=_DEMO_FAIRNESS,
        audit_layers=[0, 5, 10, 15, 20, 25, 30],
        est_minutes=15.0,
    ),
    "smoke": DemoPreset(
        name="smoke",
        model="tiny",
        n_train=120,
        n_test_per_cell=8,
        n_val_per_cell=2,
        image_size=32,
        stage1={"lr": 1e-3, "per_device_batch_size": 8, "max_steps": 3},
        stage2={"lr": 1e-3, "per_device_batch_size": 8, "max_steps": 4},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        fairness=_DEMO_FAIRNESS,
        max_new_tokens=4,
        n_boot=200,
        n_min=5,
        est_minutes=1.0,
    ),
}


def get_preset(name: str) -> DemoPreset:
    if name not in PRESETS:
        raise FairllavaError(f"demo preset {name!r} does not exist; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


@dataclass
class DemoResult:
    out_dir: Path
    preset: DemoPreset
    summary: list[dict]  # one row per method: overall, per-group, gap, ES (+CIs)
    pvalues: list[dict]
    seconds: float


def _base_model(preset: DemoPreset, out: Path, seed: int) -> Path:
    """The base VLM folder: the cached embedded model (real parts) or a saved tiny random LLaVA."""
    if preset.model == "embedded":
        from .models.embedded import ensure_embedded_vlm

        return ensure_embedded_vlm(image_size=preset.image_size, seed=seed)
    if preset.model == "tiny":
        from .models.tiny import save_tiny_llava

        target = out / "base_model"
        if not (target / "config.json").is_file():
            save_tiny_llava(target, seed=seed)
        return target
    raise FairllavaError(f"demo preset {preset.name}: unknown model kind {preset.model!r} (embedded | tiny)")


def _train_config(preset: DemoPreset, base: Path, data: Path, run_dir: Path, stage: int, method: str,
                  seed: int, projector: Optional[Path]) -> dict:
    from .data.preparers.shortcut import VOCAB_CONFIG

    optim = {"lr": 2e-4, "warmup_ratio": 0.03, "scheduler": "cosine", "grad_accum": 1, "seed": seed,
             **(preset.stage1 if stage == 1 else preset.stage2)}
    cfg: dict[str, Any] = {
        "model": {"path": str(base), "dtype": "float32", "projector_path": str(projector) if projector else None},
        "data": {"train": str(data / "train.jsonl"), "image_root": str(data / "images"),
                 "attributes": VOCAB_CONFIG, "max_length": 512, "system_prompt": preset.system_prompt},
        "output_dir": str(run_dir),
        "stage": stage,
        "method": method,
        "lora": dict(preset.lora),
        "optim": optim,
        "checkpointing": {"every_n_steps": 25, "keep_last": 1},
        "logging": {"every_n_steps": 5, "tensorboard": False, "progress": True},
    }
    if method == "fairllava":
        fair = copy.deepcopy(preset.fairness)
        fair["seed"] = seed
        cfg["fairness"] = fair
    return cfg


def _done(path: Path) -> bool:
    return (path / "run.json").is_file()


def run_demo(out_dir: str | os.PathLike, preset: str | DemoPreset = "default", seed: int = 0,
             log: Callable[[str], None] = print, progress: bool = True) -> DemoResult:
    """Run (or resume) the whole demo into ``out_dir``; returns the summary that the report shows."""
    from .data.preparers.shortcut import prepare_shortcut
    from .fairness import compare, write_comparison_report
    from .generation import generate_predictions
    from .models.loading import load_vlm
    from .training.config import TrainConfig
    from .training.trainer import train

    p = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out_dir)
    _check_writable(out)
    t0 = time.perf_counter()
    settings = {"preset": asdict(p), "seed": seed}
    prev = out / "demo.json"
    if prev.is_file() and _result_settings(json.loads(prev.read_text())["preset"]) != _result_settings(settings["preset"]):
        raise FairllavaError(f"{out}: holds a demo with other settings; use another --out or delete it")
    if prev.is_file() and json.loads(prev.read_text()).get("seed") != seed:
        raise FairllavaError(f"{out}: holds a demo with another seed; use another --out or delete it")
    atomic_write_json(prev, settings)
    log(f"demo preset '{p.name}' (seed {seed}) -> {out}; estimated {p.est_minutes:g} min on 2 CPU cores")

    data = out / "data"
    if not (data / "datacard.json").is_file():
        log(f"[1/7] rendering the shortcut benchmark ({p.task}, strength {p.strength})")
        prepare_shortcut(p.task, data, seed=seed, strength=p.strength, n_train=p.n_train,
                         n_val_per_cell=p.n_val_per_cell, n_test_per_cell=p.n_test_per_cell,
                         image_size=p.image_size, overwrite=True, progress=progress)
    base = _base_model(p, out, seed)
    log(f"[2/7] base model: {base}")

    stage1 = out / "stage1"
    if not _done(stage1):
        log("[3/7] stage 1: projector alignment (encoder and LM frozen)")
        train(TrainConfig.from_dict(_train_config(p, base, data, stage1, 1, "lora", seed, None)),
              resume=stage1.exists())
    projector = stage1 / "projector.safetensors"

    preds: dict[str, Path] = {}
    for i, method in enumerate(DEMO_METHODS):
        run_dir = out / method
        if not _done(run_dir):
            log(f"[4/7] stage 2 ({method}) from the same stage-1 projector")
            cfg = TrainConfig.from_dict(_train_config(p, base, data, run_dir, 2, method, seed, projector))
            train(cfg, resume=run_dir.exists())
        pred_path = out / "predictions" / f"{method}.jsonl"
        if not pred_path.is_file():
            log(f"[5/7] generating test answers ({method})")
            model, processor = load_vlm(base, dtype="float32", adapter=run_dir)
            generate_predictions(model, processor, data / "test.jsonl", pred_path, image_root=data / "images",
                                 batch_size=p.gen_batch_size, max_new_tokens=p.max_new_tokens,
                                 progress=progress, system_prompt=p.system_prompt)
            del model
        preds[method] = pred_path

    log("[6/7] leakage audit: linear probes of the shortcut attribute on each method's hidden states")
    audit = _audit(p, base, data, out, seed, progress)

    log("[7/7] evaluating both methods (bootstrap CIs, paired tests) and writing the report")
    datacard = json.loads((data / "datacard.json").read_text())
    cmp = compare(preds["lora"], preds["fairllava"], task="vqa", names=("lora", "fairllava"),
                  n_boot=p.n_boot, n_min=p.n_min, seed=seed, labels=datacard["labels"], run="demo")
    summary = summarize(cmp.results, cmp.pvalues)
    sessions = _record_session(out, time.perf_counter() - t0)
    meta = {**cmp.meta, "demo": settings, "machine": machine_info(),
            "seconds": round(sum(sessions), 1), "sessions": len(sessions)}
    write_comparison_report(cmp.results, cmp.pvalues, out / "report", overwrite=True, meta=meta, audit=audit)
    leakage = audit_summary(audit)
    signature = {m: shortcut_signature(preds[m], datacard) for m in DEMO_METHODS}
    atomic_write_json(out / "summary.json", {"summary": summary, "pvalues": _key_pvalues(cmp.pvalues),
                                             "leakage": leakage, "shortcut_signature": signature, "meta": meta})
    atomic_write_text(out / "summary.md", summary_markdown(summary, _key_pvalues(cmp.pvalues), meta, leakage,
                                                           signature))
    return DemoResult(out, p, summary, cmp.pvalues, time.perf_counter() - t0)


def _audit(p: DemoPreset, base: Path, data: Path, out: Path, seed: int, progress: bool) -> dict:
    """Probe the shortcut attribute in both trained models on the test split (same folds for both)."""
    from .audit.audit import AuditConfig, run_audit
    from .audit.features import FeatureConfig
    from .audit.probes import ProbeConfig
    from .data.preparers.shortcut import shortcut_vocabs
    from .io import read_jsonl
    from .models.loading import load_vlm

    audit_dir = out / "audit"
    if (audit_dir / "audit.json").is_file():
        return json.loads((audit_dir / "audit.json").read_text())
    tokens = p.fairness.get("mi_token_mode", "image")
    cfg = AuditConfig(attributes=[SHORTCUT_ATTRIBUTE],
                      features=FeatureConfig(layers=p.audit_layers or "all", tokens=tokens, pooling="masked_mean",
                                             batch_size=p.gen_batch_size, seed=seed,
                                             system_prompt=p.system_prompt),
                      probe=ProbeConfig(folds=5, seed=seed, n_boot=p.n_boot))
    models = {m: (lambda m=m: load_vlm(base, dtype="float32", adapter=out / m)) for m in DEMO_METHODS}
    return run_audit(models, read_jsonl(data / "test.jsonl"), data / "images", audit_dir, cfg,
                     vocabs=shortcut_vocabs(), overwrite=True, progress=progress)


KEY_METRIC = "accuracy"


def summarize(results: dict, pvalues: list[dict], attribute: str = SHORTCUT_ATTRIBUTE,
              metric: str = KEY_METRIC) -> list[dict]:
    """One row per method: overall, each group, gap and ES of ``metric`` for ``attribute``, with CIs."""
    rows = []
    for name, r in results.items():
        ci = r.ci
        row = {"method": name, "metric": metric, "attribute": attribute,
               "overall": r.overall[metric], "overall_ci": ci["overall"].get(metric)}
        for g, vals in r.groups[attribute].items():
            row[f"group:{g}"] = vals.get(metric)
            row[f"group:{g}_ci"] = ci["groups"].get(attribute, {}).get(g, {}).get(metric)
        row["gap"] = r.gap[attribute][metric]
        row["gap_ci"] = ci["gap"][attribute].get(metric)
        row["es"] = r.es_reported[attribute][metric]
        es_key = "es" if r.es_variant == "maxmin" else "es_fairclip"
        row["es_ci"] = ci[es_key][attribute].get(metric)
        rows.append(row)
    return rows


def _key_pvalues(pvalues: list[dict], attribute: str = SHORTCUT_ATTRIBUTE, metric: str = KEY_METRIC) -> list[dict]:
    return [p for p in pvalues if p["attribute"] == attribute and p["metric"] == metric]


def _fmt(v, ci=None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.1f}"
    if ci:
        s += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    return s


def shortcut_signature(preds_path: Path, datacard: dict) -> dict:
    """Per group: percent of test samples *without* the shortcut label that were answered with it.

    Why: the shortcut makes the model answer the label the minority is enriched for in training; the damage is in
    this false-positive rate, which the accuracy gap dilutes (the same shortcut makes the minority's true
    positives right). Without a shortcut the groups' rates agree.
    """
    from .io import read_jsonl
    from .metrics.vqa import LabelSet, parse_labels

    sc = datacard["shortcut"]
    target = max(sc["train_minority_label_probs"], key=sc["train_minority_label_probs"].get)
    rows = read_jsonl(preds_path)
    pred = parse_labels([r["prediction"] for r in rows], LabelSet.ham(list(datacard["labels"])))
    out = {"label": target, "attribute": sc["attribute"], "groups": {}}
    for g in sorted({r["attributes"][sc["attribute"]] for r in rows}):
        neg = [p for r, p in zip(rows, pred) if r["attributes"][sc["attribute"]] == g and r["label"] != target]
        hits = sum(p == target for p in neg)
        out["groups"][g] = {"n": len(neg), "false_positive_pct": 100.0 * hits / max(len(neg), 1)}
    return out


def audit_summary(audit: dict, attribute: str = SHORTCUT_ATTRIBUTE) -> dict:
    """Per method: probe balanced accuracy (percent) of the shortcut attribute at each audited layer."""
    return {name: {str(r["layer"]): 100 * r["balanced_accuracy"] for r in m["attributes"][attribute]["per_layer"]}
            for name, m in audit["models"].items()}


def verdict(summary: list[dict], pvalues: list[dict], alpha: float = 0.05) -> str:
    """One sentence computed from the numbers (never typed by hand): did FairLLaVA beat the baseline?"""
    rows = {r["method"]: r for r in summary}
    if "lora" not in rows or "fairllava" not in rows:
        return "no baseline/method pair to compare"
    base, fair = rows["lora"], rows["fairllava"]
    p_gap = next((p["p_one_sided"] for p in pvalues if p["quantity"] == "gap"), None)
    d_overall = fair["overall"] - base["overall"]
    if p_gap is not None and p_gap < alpha:
        return (f"FairLLaVA reduced the gap from {base['gap']:.1f} to {fair['gap']:.1f} points (p = {p_gap:.3g}); "
                f"overall accuracy changed by {d_overall:+.1f} points")
    return (f"FairLLaVA did not beat the baseline here: gap {base['gap']:.1f} -> {fair['gap']:.1f} points is not a "
            f"significant reduction (p = {p_gap:.3g}); overall accuracy changed by {d_overall:+.1f} points")


def summary_markdown(summary: list[dict], pvalues: list[dict], meta: dict, leakage: dict | None = None,
                     signature: dict | None = None) -> str:
    """The results table pasted into the README (regenerated by ``make results``)."""
    groups = [k[len("group:"):] for k in summary[0] if k.startswith("group:") and not k.endswith("_ci")]
    head = ["method", f"overall {KEY_METRIC}"] + [f"{SHORTCUT_ATTRIBUTE}={g}" for g in groups] + ["gap Δ", "ES"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["method"], _fmt(r["overall"], r["overall_ci"])]
        cells += [_fmt(r[f"group:{g}"], r[f"group:{g}_ci"]) for g in groups]
        cells += [_fmt(r["gap"], r["gap_ci"]), _fmt(r["es"], r["es_ci"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"- **{verdict(summary, pvalues)}**")
    for pv in pvalues:
        lines.append(f"- paired bootstrap, H1 FairLLaVA has {'smaller gap' if pv['quantity'] == 'gap' else 'higher ES'}:"
                     f" one-sided p = {pv['p_one_sided']:.3g}")
    for name, sig in (signature or {}).items():
        cells = ", ".join(f"{g} {v['false_positive_pct']:.0f} % of {v['n']}" for g, v in sig["groups"].items())
        lines.append(f"- shortcut signature of `{name}`: non-{sig['label']} test cases answered {sig['label']}, by "
                     f"{sig['attribute']}: {cells}")
    if leakage:
        for name, per_layer in leakage.items():
            cells = ", ".join(f"{layer}: {v:.0f}" for layer, v in per_layer.items())
            lines.append(f"- leakage probe ({SHORTCUT_ATTRIBUTE}, balanced accuracy %, chance 50) of `{name}` by "
                         f"hidden-state index: {cells}")
    d = meta.get("demo", {})
    m = meta.get("machine", {})
    lines.append(f"- preset `{d.get('preset', {}).get('name')}`, seed {d.get('seed')}, {meta.get('n_resamples')} "
                 f"bootstrap resamples, {meta.get('seconds')} s wall time in {meta.get('sessions', 1)} session(s) on "
                 f"{m.get('cpu_count')} CPU cores "
                 f"({m.get('platform')}, torch {m.get('torch')})")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(terse=True), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def _result_settings(preset: dict) -> dict:
    """The preset fields that change results (the time estimate does not)."""
    return {k: v for k, v in preset.items() if k != "est_minutes"}


def _record_session(out: Path, seconds: float) -> list[float]:
    """Wall time of every invocation on this folder: a resumed demo reports the sum, not the last session."""
    path = out / "timing.json"
    sessions = json.loads(path.read_text())["sessions"] if path.is_file() else []
    sessions.append(round(seconds, 1))
    atomic_write_json(path, {"sessions": sessions})
    return sessions


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise FairllavaError(f"{out}: output folder is not writable ({e.strerror}); pass --out to a writable folder")


README_BEGIN = "<!-- demo-results:begin -->"
README_END = "<!-- demo-results:end -->"


def update_readme(readme: str | os.PathLike, summary_md: str) -> None:
    """Replace the block between the demo-results markers with a run's ``summary.md``."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise FairllavaError(f"{path}: missing the {README_BEGIN} / {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_text(path, head + README_BEGIN + "\n" + summary_md + README_END + tail)
