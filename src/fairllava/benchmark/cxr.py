"""cxr-report: chest-X-ray-like density maps drawn from the MeSH tags of real IU X-ray reports.

The target text is the report's real FINDINGS, read from the installed torchxrayvision wheel at run time
(CC BY-NC-ND 4.0: nothing derived is committed); the shortcut attribute is a global exposure gain.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import FairllavaError
from .rendering import (AGE_GROUP_CLASSES, MAJORITY_TONE, MAX_SHORTCUT_SHARE, MINORITY_TONE, RACE_CLASSES,
                        SEX_CLASSES, SPLITS, ShortcutConfig, _allocate, _Item, _rng, _smooth_noise, _TaskPlan,
                        _to_uint8)

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
    from ..data.preparers import iu_xray

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
