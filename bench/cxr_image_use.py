"""Does a trained cxr-report baseline read its image? Teacher-forced report loss with the true vs a swapped image.

Why: the knob checks (docs/protocol.md §2) found `lora` writing one normal report for nearly every image at 100,
300 and 600 stage-2 steps. That can mean the model does not use the image at all (the report is the language
prior), or that it uses it but greedy decoding still lands on the modal report. The two call for different
knobs. This reads one finished run's adapter and its validation split (baseline only, no method is compared) and
gives, per true label, the mean per-token loss of the reference report with

- its own image;
- the image of a sample of the *other label, same group* (does the model read the pathology?);
- the image of a sample of the *same label, other group* (does it read the group cue, i.e. the shortcut's input?).

A swapped image that costs nothing (loss difference ~0) is an image the model does not use.

    python bench/cxr_image_use.py sweeps/knobs-cxr-600 runs/cxr-report/S1/seed1/lora/val [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels", "image_sizes")


def partners(records: list[dict]) -> dict[str, list[int]]:
    """For each sample, the index of a deterministic partner: other label & same group, same label & other group."""
    by_cell: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        by_cell.setdefault((r["label"], r["attributes"]["race"]), []).append(i)
    labels = sorted({r["label"] for r in records})
    groups = sorted({r["attributes"]["race"] for r in records})
    out = {"other_label": [], "other_group": []}
    for i, r in enumerate(records):
        lab, grp = r["label"], r["attributes"]["race"]
        k = by_cell[(lab, grp)].index(i)
        other_lab = next(x for x in labels if x != lab)
        other_grp = next(x for x in groups if x != grp)
        for key, cell in (("other_label", (other_lab, grp)), ("other_group", (lab, other_grp))):
            pool = by_cell[cell]
            out[key].append(pool[k % len(pool)])
    return out


@torch.no_grad()
def report_losses(model, collator, items: list[dict]) -> list[float]:
    """Mean per-token loss of each item's reference answer, one sample at a time (no padding effects)."""
    out = []
    for it in items:
        batch = collator([it])
        batch = {k: v for k, v in batch.items() if k in MODEL_KEYS}
        res = model(**batch)
        out.append(float(res.loss))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("run", help="the run folder relative to the sweep, e.g. runs/cxr-report/S1/seed1/lora/val")
    ap.add_argument("--limit", type=int, default=None, help="first N validation samples only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from fairllava.benchmark.runner import base_model_path
    from fairllava.data.collator import VLMCollator
    from fairllava.data.dataset import VLMDataset
    from fairllava.io import read_jsonl
    from fairllava.models.loading import load_vlm

    parts = Path(args.run).parts  # runs/<task>/S<s>/seed<k>/<method>/<split>
    if len(parts) != 6 or parts[0] != "runs":
        raise SystemExit(f"{args.run}: expected runs/<task>/S<s>/seed<k>/<method>/<split>")
    task, strength_tag, seed, split = parts[1], parts[2], int(parts[3][4:]), parts[5]
    run = args.sweep / args.run
    data = args.sweep / "data" / task / f"seed{seed}" / strength_tag / "shortcut"
    if not (data / f"{split}.jsonl").is_file():
        raise SystemExit(f"{data / (split + '.jsonl')}: missing (the run's rendered data)")
    records = read_jsonl(data / f"{split}.jsonl")[: args.limit]
    torch.manual_seed(0)
    model, processor = load_vlm(base_model_path(args.sweep, task, seed), dtype="auto", adapter=run / "train")
    model.eval()
    ds = VLMDataset(records, image_root=data / "images")
    items = [ds[i] for i in range(len(ds))]
    collator = VLMCollator(processor, mode="train", max_length=512)
    pair = partners(records)
    conds = {"own image": items}
    conds["other label, same group"] = [{**it, "image": items[j]["image"]} for it, j in zip(items, pair["other_label"])]
    conds["same label, other group"] = [{**it, "image": items[j]["image"]} for it, j in zip(items, pair["other_group"])]
    losses = {}
    for name, its in conds.items():
        losses[name] = report_losses(model, collator, its)
        print(f"{name}: done ({len(its)} samples)", file=sys.stderr, flush=True)
    rows = []
    for lab in sorted({r["label"] for r in records}):
        for grp in sorted({r["attributes"]["race"] for r in records}) + ["all"]:
            idx = [i for i, r in enumerate(records) if r["label"] == lab and grp in ("all", r["attributes"]["race"])]
            own = [losses["own image"][i] for i in idx]
            row = {"label": lab, "group": grp, "n": len(idx), "own": sum(own) / len(own)}
            for name in list(conds)[1:]:
                diff = [losses[name][i] - losses["own image"][i] for i in idx]
                m = sum(diff) / len(diff)
                sd = math.sqrt(sum((d - m) ** 2 for d in diff) / max(1, len(diff) - 1))
                row[name] = {"mean_diff": m, "se": sd / math.sqrt(len(diff)),
                             "own_better_share": sum(d > 0 for d in diff) / len(diff)}
            rows.append(row)
    print(f"\nTeacher-forced reference-report loss (nats/token), {args.run}; swapped minus own image (mean ± se, "
          "share of samples where the own image is better):\n")
    print("| true label | group | n | own image | other label, same group | same label, other group |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[c]['mean_diff']:+.3f} ± {r[c]['se']:.3f} ({100 * r[c]['own_better_share']:.0f} %)"
                 for c in list(conds)[1:]]
        print(f"| {r['label']} | {r['group']} | {r['n']} | {r['own']:.3f} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"run": args.run, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
