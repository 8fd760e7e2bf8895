"""Shared parts of the shortcut benchmark's renderers: constants, the S mapping, per-item random streams,
exact split tables, synthetic patients and image helpers.

Why one module: both tasks (``derm.py``, ``cxr.py``) draw their samples the same way — one
``SeedSequence(seed, spawn_key=(stable_hash(...),))`` stream per item, counts allocated exactly, never
sampled — so two runs with the same arguments give byte-identical folders (docs/benchmark.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..io import stable_hash

TASKS = ("derm-vqa", "cxr-report")
SPLITS = ("train", "val", "test")
GENERATOR_VERSION = 1

#: The shortcut attribute: a synthetic race-like group rendered as background skin tone.
RACE_CLASSES = ["light", "dark"]
SEX_CLASSES = ["M", "F"]
AGE_GROUP_CLASSES = ["0-44", "45-65", "66+"]
#: Which tone is the minority in the training split (and receives the shortcut).
MINORITY_TONE = "dark"
MAJORITY_TONE = "light"

#: Attribute vocabularies in ``fairllava.data.attributes.vocabs_from_config`` format (also in the datacard).
VOCAB_CONFIG = {"race": {"classes": RACE_CLASSES}, "sex": "sex", "age_group": "age_group"}

#: Target share of the shortcut class (melanoma) in the minority group at S = 1 (BENCHMARK-NOTES setting).
MAX_SHORTCUT_SHARE = 0.85


@dataclass
class ShortcutConfig:
    """Arguments of :func:`prepare_shortcut` (all recorded in the datacard)."""

    task: str = "derm-vqa"
    seed: int = 0
    strength: float = 1.0
    n_train: int = 1200
    n_val_per_cell: int = 10
    n_test_per_cell: int = 50
    image_size: int = 128
    minority_frac: float = 0.3
    evidence_probe: bool = True
    n_probe_per_cell: int = 100

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {', '.join(TASKS)}")
        if not (0.0 <= float(self.strength) <= 1.0):
            raise ValueError(f"strength={self.strength}: expected a number in [0, 1]")
        if not (0.0 < float(self.minority_frac) < 0.5 + 1e-9):
            raise ValueError(f"minority_frac={self.minority_frac}: expected 0 < minority_frac <= 0.5")
        if self.n_train < 12:
            raise ValueError(f"n_train={self.n_train}: expected at least 12")
        for name in ("n_val_per_cell", "n_test_per_cell"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.n_probe_per_cell < 10:
            raise ValueError(f"n_probe_per_cell={self.n_probe_per_cell}: expected at least 10")
        if not (32 <= self.image_size <= 512):
            raise ValueError(f"image_size={self.image_size}: expected 32..512 pixels")



def shortcut_vocabs() -> dict:
    """``{"race", "sex", "age_group"} -> AttributeVocab`` for training/auditing on this benchmark."""
    from ..data.attributes import vocabs_from_config

    return vocabs_from_config(VOCAB_CONFIG)


# ----------------------------------------------------------------------------- shared helpers


def _rng(seed: int, *key: object) -> np.random.Generator:
    """A per-item random stream: independent of generation order, identical across processes."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stable_hash(*key),)))


def shortcut_class_probs(n_classes: int, strength: float, max_share: float = MAX_SHORTCUT_SHARE) -> list[float]:
    """Class distribution of the *minority* group in the training split.

    ``p(shortcut class) = 1/K + S * (max_share - 1/K)``; the other classes share the rest equally.
    S = 0 -> uniform (class independent of group); S = 1 -> ``max_share`` (0.85 with K = 3).
    The majority group is uniform at every S.
    """
    base = 1.0 / n_classes
    p0 = base + float(strength) * (max_share - base)
    rest = (1.0 - p0) / (n_classes - 1)
    return [p0] + [rest] * (n_classes - 1)


def _allocate(n: int, probs: Sequence[float]) -> list[int]:
    """Exact counts summing to ``n`` (largest remainder): the split table follows S without sampling noise."""
    raw = [n * p for p in probs]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(probs)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]-ish: a random ``cells x cells`` grid bilinearly upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i0 = np.floor(t).astype(int)
    f = t - i0
    a = grid[i0][:, i0] * (1 - f)[None, :] + grid[i0][:, i0 + 1] * f[None, :]
    b = grid[i0 + 1][:, i0] * (1 - f)[None, :] + grid[i0 + 1][:, i0 + 1] * f[None, :]
    return a * (1 - f)[:, None] + b * f[:, None]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if arr.ndim == 2 else "RGB"
    Image.fromarray(arr, mode=mode).save(path, format="PNG", optimize=False)


def _patient_plan(rng: np.random.Generator, cells: list[tuple[str, str]], start: int) -> list[dict]:
    """Group (tone, class) cells into synthetic patients of 1-3 images sharing tone, sex and age group."""
    by_tone: dict[str, list[str]] = {}
    for tone, cls in cells:
        by_tone.setdefault(tone, []).append(cls)
    plan: list[dict] = []
    pid = start
    for tone in RACE_CLASSES:
        classes = by_tone.get(tone, [])
        order = rng.permutation(len(classes))
        classes = [classes[i] for i in order]
        i = 0
        while i < len(classes):
            k = int(rng.choice([1, 1, 2, 3]))
            sex = SEX_CLASSES[int(rng.integers(2))]
            age = AGE_GROUP_CLASSES[int(rng.choice(3, p=[0.35, 0.45, 0.20]))]
            for cls in classes[i : i + k]:
                plan.append({"patient": f"P{pid:05d}", "race": tone, "sex": sex, "age_group": age, "label": cls})
            pid += 1
            i += k
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def _split_cells(cfg: ShortcutConfig, labels: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(tone, label) cells per split: train follows S for the minority; val/test are balanced."""
    n_min = int(round(cfg.n_train * cfg.minority_frac))
    n_maj = cfg.n_train - n_min
    uniform = [1.0 / len(labels)] * len(labels)
    cells: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for tone, n, probs in (
        (MAJORITY_TONE, n_maj, uniform),
        (MINORITY_TONE, n_min, shortcut_class_probs(len(labels), cfg.strength)),
    ):
        for lab, c in zip(labels, _allocate(n, probs)):
            cells["train"] += [(tone, lab)] * c
    for split, per in (("val", cfg.n_val_per_cell), ("test", cfg.n_test_per_cell)):
        for tone in RACE_CLASSES:
            for lab in labels:
                cells[split] += [(tone, lab)] * per
    return cells


@dataclass
class _Item:
    """One planned sample before rendering."""

    split: str
    index: int
    patient: str
    race: str
    sex: str | None
    age_group: str | None
    label: str
    extra: dict = field(default_factory=dict)

@dataclass
class _TaskPlan:
    """What a task contributes: planned items, how to render and record them, and its datacard text."""

    items: list[_Item]
    labels: list[str]
    render: Callable[[np.random.Generator, _Item, int], tuple[np.ndarray, dict]]
    record: Callable[[_Item, str, dict], dict]
    probe_item: Callable[[str, str, int], _Item]
    process: dict
