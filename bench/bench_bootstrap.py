"""Speed of the sufficient-statistics bootstrap vs naive re-scoring with sacrebleu per resample.

Workload (EVALUATION §5.2): ~2,500 synthetic reports, attributes race (5 groups) / age (3) / sex (2),
BLEU-1 and BLEU-4; for every (attribute, metric) 1000 resamples recomputing M_all, every M_g, the gap and
ES. The naive path calls ``sacrebleu.corpus_bleu`` on each resampled corpus and group; it is timed on a few
resamples and extrapolated. Run: ``python bench/bench_bootstrap.py [--n 2500] [--naive-resamples 3]``.
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import sacrebleu

from fairllava.fairness import bootstrap_scores, evaluate_predictions, frame_scores, group_index, rng_for
from fairllava.metrics.text import bleu_metrics

WORDS = ("the heart size is normal mediastinal contours are within normal limits no focal consolidation pleural "
         "effusion or pneumothorax mild bibasilar atelectasis stable cardiomegaly . , left right lung lobe").split()


def synthetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ref = " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))
        pred = " ".join(w if rng.random() < 0.6 else rng.choice(WORDS) for w in ref.split()[: rng.randint(15, 60)])
        rows.append({"id": f"s{i}", "prediction": pred, "reference": ref, "attributes": {
            "race": rng.choice(["White"] * 6 + ["Black", "Asian", "Hispanic", "Other"]),
            "age_group": rng.choice(["0-44", "45-65", "66+"]), "sex": rng.choice(["F", "M"])}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--naive-resamples", type=int, default=3)
    args = ap.parse_args()
    rows = synthetic(args.n)
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    attrs = ["race", "age_group", "sex"]
    metrics = {"bleu1": 1, "bleu4": 4}

    t0 = time.perf_counter()
    ms = bleu_metrics(preds, refs, orders=(1, 4))
    t_stats = time.perf_counter() - t0
    gis = {a: group_index(a, [r["attributes"][a] for r in rows], 20) for a in attrs}
    t0 = time.perf_counter()
    for a in attrs:
        for m in metrics:
            bootstrap_scores(lambda W: frame_scores(ms[m], W, gis[a]), args.n, args.n_boot, rng_for(0, "bench", a, m))
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    for a in attrs:
        for m, order in metrics.items():
            rng = rng_for(0, "bench", a, m)
            bleu = sacrebleu.metrics.BLEU(max_ngram_order=order, force=True)
            for _ in range(args.naive_resamples):
                draw = rng.integers(0, args.n, size=args.n)
                bleu.corpus_score([preds[i] for i in draw], [[refs[i] for i in draw]])
                vals = np.array([rows[i]["attributes"][a] for i in draw])
                for g in gis[a].groups:
                    sel = draw[vals == g]
                    bleu.corpus_score([preds[i] for i in sel], [[refs[i] for i in sel]])
    t_naive = (time.perf_counter() - t0) / args.naive_resamples * args.n_boot

    t0 = time.perf_counter()
    evaluate_predictions(rows, "report", attributes=attrs, metrics=list(metrics), n_boot=args.n_boot)
    t_full = time.perf_counter() - t0

    cells = len(attrs) * len(metrics)
    print(f"workload: {args.n} reports, {cells} (attribute, metric) cells x {args.n_boot} resamples "
          f"(overall + every group + gap + ES per resample)")
    print(f"sufficient statistics: extraction {t_stats:.2f} s (once), bootstrap {t_fast:.2f} s")
    print(f"naive sacrebleu re-scoring: {t_naive:.1f} s (extrapolated from {args.naive_resamples} resamples per cell)")
    print(f"full evaluate_predictions (stats + point values + overall & group CIs): {t_full:.2f} s")
    print(f"speed-up, bootstrap only: {t_naive / t_fast:.0f}x; including one-off statistics extraction: "
          f"{t_naive / (t_fast + t_stats):.0f}x (target >= 50x)")


if __name__ == "__main__":
    main()
