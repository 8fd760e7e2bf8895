"""derm-vqa: dermoscopy-style lesions (MEL / NV / VASC) on a background skin tone (the shortcut attribute).

Everything is rendered in log space relative to the background, so a dark-tone image is a per-channel
rescaling of the same scene on a light tone: both groups carry the same visual evidence (docs/benchmark.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..io import stable_hash
from .rendering import (AGE_GROUP_CLASSES, SEX_CLASSES, SPLITS, ShortcutConfig, _Item, _patient_plan, _rng,
                        _smooth_noise, _split_cells, _TaskPlan, _to_uint8, shortcut_class_probs)

DERM_LABELS = ["MEL", "NV", "VASC"]
DERM_ANSWERS = {"MEL": "melanoma.", "NV": "nevus.", "VASC": "vascular lesion."}
DERM_QUESTIONS = [
    "What type of skin lesion is this? Answer with one of: melanoma, nevus, vascular lesion.",
    "Which diagnosis fits this dermoscopy image best: melanoma, nevus or vascular lesion?",
    "Classify the lesion in this image as melanoma, nevus or vascular lesion.",
]

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
