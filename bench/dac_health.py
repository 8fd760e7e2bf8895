"""Does the DAC learn on the paper's pathway of the demo model? Real stage-2 runs, read at the health warm-up.

For each estimator setting this runs the real trainer (embedded demo VLM, the demo's stage-1 projector, LoRA on
every LM linear, the shortcut attribute ``race``) for ``--warmup + 1`` optimizer steps at the paper's layer
(``mi_layer_frac: 0.5`` -> hidden-state index 15 of 31 on SmolLM2, so the penalty reaches LoRA weights) with image tokens,
and reports the held-out (prequential) DAC balanced accuracy ``dac_bacc/race`` logged at the warm-up step and
whether the dead-DAC warning fired. Settings:

- ``paper``: the paper/reference estimator (one random token, L2-normalised, DAC at the LoRA lr);
- ``recommended``: ``fairllava.regularizer.config.RECOMMENDED_ESTIMATOR`` (standardised z, DAC lr 1e-2, every
  image token, other-sample negatives).

Training data only: the metric is computed on training batches before the heads train on them; no validation or
test label is read. Expected (issue 13): ``recommended`` >= 0.75 and no warning; ``paper`` warns.

    python bench/dac_health.py --out runs/dac_health [--warmup 50] [--seed 0]   # ~3 min per setting on 2 cores
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from fairllava.benchmark.prepare import prepare_shortcut
from fairllava.demo import REFERENCE_FAIRNESS, _base_model, _done, _train_config, get_preset
from fairllava.regularizer.config import RECOMMENDED_ESTIMATOR
from fairllava.regularizer.health import DeadDACWarning
from fairllava.training.config import TrainConfig
from fairllava.training.trainer import train

SETTINGS = {"paper": {}, "recommended": RECOMMENDED_ESTIMATOR}


def run_setting(name: str, out: Path, warmup: int, seed: int, preset: str = "default") -> dict:
    p = get_preset(preset)
    data = out / "data"
    if not (data / "datacard.json").is_file():
        prepare_shortcut(p.task, data, seed=seed, strength=p.strength, n_train=p.n_train,
                         n_val_per_cell=p.n_val_per_cell, n_test_per_cell=p.n_test_per_cell,
                         image_size=p.image_size, overwrite=True)
    base = _base_model(p, out, seed)
    s1 = out / "stage1"
    if not _done(s1):
        train(TrainConfig.from_dict(_train_config(p, base, data, s1, 1, "lora", seed, None)), resume=s1.exists())
    run = out / name
    if (run / "dac_health.json").is_file():  # finished earlier (the warning is not re-emitted on a rerun)
        return json.loads((run / "dac_health.json").read_text())
    cfg = _train_config(p, base, data, run, 2, "fairllava", seed, s1 / "projector.safetensors")
    cfg["fairness"] = {**REFERENCE_FAIRNESS, "seed": cfg["fairness"]["seed"], **SETTINGS[name],
                       "mi_layer_frac": 0.5, "mi_layer_index": None, "mi_token_mode": "image",
                       "dac_health_warmup_steps": warmup, "on_dead_dac": "warn"}
    cfg["optim"]["max_steps"] = warmup + 1
    cfg["logging"]["every_n_steps"] = 1
    cfg["checkpointing"]["every_n_steps"] = warmup + 1
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeadDACWarning)
        if not _done(run):
            train(TrainConfig.from_dict(cfg), resume=run.exists())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    at = next(r for r in rows if r["step"] == warmup + 1)  # logged after the step that ran the check
    warned = any(issubclass(w.category, DeadDACWarning) for w in caught)
    res = {"setting": name, "layer_index": int(0.5 * (_n_blocks(base) + 1)), "dac_bacc_at_warmup": at.get("dac_bacc/race"),
            "dac_acc_at_warmup": at.get("dac_acc/race"), "mi": at.get("mi/race"), "warned": warned,
            "seconds": round(time.perf_counter() - t0)}
    (run / "dac_health.json").write_text(json.dumps(res))
    return res


def _n_blocks(base: Path) -> int:
    cfg = json.loads((Path(base) / "config.json").read_text())
    return int((cfg.get("text_config") or cfg)["num_hidden_layers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warmup", type=int, default=50, help="fairness.dac_health_warmup_steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, choices=list(SETTINGS))
    ap.add_argument("--preset", default="default", help="demo preset (smoke = the tiny random model, a code check)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = [run_setting(n, a.out, a.warmup, a.seed, a.preset) for n in SETTINGS if not a.only or n in a.only]
    print("| setting | held-out DAC balanced accuracy at the warm-up | per-batch accuracy | dead-DAC warning |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['dac_bacc_at_warmup']:.3f} | {r['dac_acc_at_warmup']:.3f} | "
              f"{'yes' if r['warned'] else 'no'} |")
    ok = all((r["dac_bacc_at_warmup"] >= 0.75 and not r["warned"]) if r["setting"] == "recommended" else r["warned"]
             for r in results)
    print(json.dumps(results))
    print("PASS" if ok else "FAIL: expected recommended >= 0.75 without a warning and a warning for paper")


if __name__ == "__main__":
    main()
