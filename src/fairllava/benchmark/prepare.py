"""``prepare_shortcut``: render one shortcut-benchmark folder (records, PNGs, datacard) atomically.

The generative processes live in ``derm.py`` and ``cxr.py``; this module plans the items, renders them
in a fixed order, writes the split files and the datacard under a temporary name and renames it into place.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from ..io import atomic_dir, atomic_write_json, atomic_write_jsonl
from .cxr import _cxr_plan
from .derm import _derm_plan
from .evidence import _evidence_probe
from .rendering import (AGE_GROUP_CLASSES, GENERATOR_VERSION, MINORITY_TONE, RACE_CLASSES, SEX_CLASSES, SPLITS,
                        VOCAB_CONFIG, ShortcutConfig, _Item, _rng, _save_png)

def _progress(enabled: bool):
    from ..progress import progress_display

    return progress_display(enabled=enabled, transient=True)


def _counts(items: list[_Item], labels: list[str]) -> dict:
    table: dict = {}
    for split in SPLITS:
        rows = [it for it in items if it.split == split]
        by_group = {t: {lab: 0 for lab in labels} for t in RACE_CLASSES}
        sex = {k: 0 for k in [*SEX_CLASSES, "null"]}
        age = {k: 0 for k in [*AGE_GROUP_CLASSES, "null"]}
        for it in rows:
            by_group[it.race][it.label] += 1
            sex[it.sex or "null"] += 1
            age[it.age_group or "null"] += 1
        table[split] = {"n": len(rows), "patients": len({it.patient for it in rows}),
                        "race_x_label": by_group, "sex": sex, "age_group": age}
    return table


def prepare_shortcut(task: str, out_dir: str | os.PathLike, seed: int = 0, strength: float = 1.0, *,
                     n_train: int = 1200, n_val_per_cell: int = 10, n_test_per_cell: int = 50,
                     image_size: int = 128, minority_frac: float = 0.3, evidence_probe: bool = True,
                     evidence_features: str = "pixels", n_probe_per_cell: int = 100,
                     iu_data_dir: str | os.PathLike | None = None,
                     overwrite: bool = False, progress: bool = True) -> dict:
    """Render the shortcut benchmark into ``out_dir``; returns the datacard.

    Layout: ``{train,val,test}.jsonl`` (records per DESIGN.md, ``image`` relative to ``out_dir/images``),
    ``images/<split>/<id>.png`` and ``datacard.json``. The folder is built under a temporary name and
    renamed into place, so an interrupted run leaves nothing that looks complete.
    """
    cfg = ShortcutConfig(task=task, seed=int(seed), strength=float(strength), n_train=int(n_train),
                         n_val_per_cell=int(n_val_per_cell), n_test_per_cell=int(n_test_per_cell),
                         image_size=int(image_size), minority_frac=float(minority_frac),
                         evidence_probe=bool(evidence_probe), n_probe_per_cell=int(n_probe_per_cell))
    cfg.validate()
    if evidence_features not in ("pixels", "efficientnet"):
        raise ValueError(f"evidence_features={evidence_features!r}: expected 'pixels' or 'efficientnet'")
    plan = _derm_plan(cfg) if task == "derm-vqa" else _cxr_plan(cfg, iu_data_dir)
    items, labels, process = plan.items, plan.labels, plan.process

    out_dir = Path(out_dir)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, _progress(progress) as bar:
        job = bar.add_task(f"rendering {task}", total=len(items))
        for it in items:
            img, params = plan.render(_rng(cfg.seed, task, "item", it.split, it.index), it, cfg.image_size)
            rel = f"{it.split}/{task}-{it.split}-{it.index:05d}.png"
            _save_png(img, tmp / "images" / rel)
            records[it.split].append(plan.record(it, rel, params))
            bar.advance(job)
        for split in SPLITS:
            atomic_write_jsonl(tmp / f"{split}.jsonl", records[split])
        probe = None
        if evidence_probe:
            job = bar.add_task("evidence probe", total=None)
            probe = _evidence_probe(cfg, plan, evidence_features)
            bar.update(job, completed=1, total=1)
        card = {
            "name": f"fairllava-shortcut-{task}",
            "generator_version": GENERATOR_VERSION,
            "task": task,
            "config": {**asdict(cfg), "evidence_features": evidence_features},
            "attributes": {
                "race": {"classes": RACE_CLASSES, "rendered_as": process["race_cue"],
                         "minority": MINORITY_TONE, "shortcut": True},
                "sex": {"classes": SEX_CLASSES, "rendered_as": process["sex_cue"], "shortcut": False},
                "age_group": {"classes": AGE_GROUP_CLASSES, "rendered_as": process["age_cue"], "shortcut": False},
            },
            "vocabs": VOCAB_CONFIG,
            "labels": labels,
            "shortcut": {
                "attribute": "race", "minority": MINORITY_TONE, "strength": cfg.strength,
                "mapping": process["mapping"],
                "train_minority_label_probs": process["minority_probs"],
                "train_majority_label_probs": process["majority_probs"],
                "val_test": "balanced: equal count per race x label cell (decorrelated)",
            },
            "generative_process": process["description"],
            "counts": _counts(items, labels),
            "evidence_probe": probe,
            "files": {"records": [f"{s}.jsonl" for s in SPLITS], "image_root": "images", "datacard": "datacard.json"},
            "licence": process["licence"],
        }
        atomic_write_json(tmp / "datacard.json", card)
    return card
