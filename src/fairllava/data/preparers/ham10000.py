"""HAM10000 dermoscopy VQA (EVALUATION.md §2.3): lesion-grouped splits, HAM age bins, sex.

Why: the reference shuffled QA rows, so the same image and lesion sat in train and test
(METHOD.md §12 #8). Here the split unit is ``lesion_id`` (which also groups images), seeded and
optionally stratified by ``dx``. QA pairs come from a SelfSynthX-style JSON when given; otherwise
several templates name the class, chosen per image by a stable hash.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ...errors import FairllavaError
from ...io import stable_hash
from ..attributes import HAM_AGE_BINS, age_to_group
from .common import (
    DataCard,
    check_fractions,
    conversation,
    grouped_split,
    iter_json_records,
    prepared_output,
    read_csv_checked,
    source_info,
)

ATTRIBUTES = ["sex", "age_group"]
DX_CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DX_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
SEX_MAP = {"male": "M", "female": "F", "unknown": None}
QUESTIONS = (
    "What type of skin lesion is this?",
    "What is the most likely diagnosis for the lesion in this dermoscopy image?",
    "Which category of pigmented skin lesion does this dermoscopic image show?",
    "Identify the skin lesion shown in this image.",
)
ANSWERS = (
    "This is {name} ({code}).",
    "The most likely diagnosis is {name} ({code}).",
    "The image shows {name} ({code}).",
)


@dataclass
class HamConfig:
    metadata: str = ""
    qa: str | None = None  # SelfSynthX-style JSON: [{img_path, image_id, new_QA: [{Q, A}]}]
    images: str | None = None  # optional image root: images are located by file stem (part_1/part_2 folders)
    image_template: str = "{image_id}.jpg"
    stratify: bool = True
    missing: Literal["drop", "keep"] = "keep"
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1

    def validate(self) -> None:
        if not self.metadata:
            raise FairllavaError("--metadata: HAM10000_metadata.csv is required")
        if self.missing not in ("drop", "keep"):
            raise FairllavaError(f"--missing {self.missing!r}: expected drop or keep")
        if self.images is not None and not Path(self.images).is_dir():
            raise FairllavaError(f"--images {self.images}: not a directory")
        check_fractions(self.val_frac, self.test_frac)


def load_metadata(path: str) -> list[dict]:
    """Rows with validated dx / age / sex; errors are located ``file:line``."""
    df = read_csv_checked(path, ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"],
                          needed=["lesion_id", "image_id", "dx", "age", "sex"], dtype=str, keep_default_na=False)
    out = []
    seen: dict[str, int] = {}
    for i, row in enumerate(df.to_dict("records")):
        line = i + 2
        iid = (row["image_id"] or "").strip()
        lid = (row["lesion_id"] or "").strip()
        if not iid or not lid:
            raise FairllavaError(f"{path}:{line}: empty {'image_id' if not iid else 'lesion_id'}")
        if iid in seen:
            raise FairllavaError(f"{path}:{line}: duplicate image_id {iid!r} (first at line {seen[iid]})")
        seen[iid] = line
        dx = (row["dx"] or "").strip().lower()
        if dx not in DX_CODES:
            raise FairllavaError(f"{path}:{line} (image_id={iid}): dx {row['dx']!r} not one of {', '.join(DX_CODES)}")
        raw_age = (row["age"] or "").strip()
        age = None if raw_age.lower() in ("", "nan", "na") else raw_age
        age_group = age_to_group(age, HAM_AGE_BINS, where=f"{path}:{line} (image_id={iid}) age")
        sex_raw = (row["sex"] or "").strip().lower()
        if sex_raw not in SEX_MAP and sex_raw != "":
            raise FairllavaError(f"{path}:{line} (image_id={iid}): sex {row['sex']!r} (expected male, female or unknown)")
        out.append({
            "image_id": iid, "lesion_id": lid, "dx": dx, "dx_type": (row.get("dx_type") or None),
            "age": None if age is None else float(age), "age_group": age_group,
            "sex": SEX_MAP.get(sex_raw), "localization": (row.get("localization") or None),
        })
    if not out:
        raise FairllavaError(f"{path}: no rows")
    return out


def load_qa(path: str) -> dict[str, list[tuple[str, str]]]:
    qa: dict[str, list[tuple[str, str]]] = {}
    for i, obj in iter_json_records(path):
        where = f"{path}:[{i}]"
        if not isinstance(obj, dict) or "image_id" not in obj or not isinstance(obj.get("new_QA"), list):
            raise FairllavaError(f"{where}: expected an object with image_id and a new_QA list")
        pairs = qa.setdefault(str(obj["image_id"]), [])
        for j, p in enumerate(obj["new_QA"]):
            if not isinstance(p, dict) or not isinstance(p.get("Q"), str) or not isinstance(p.get("A"), str):
                raise FairllavaError(f"{where} (image_id={obj['image_id']}): new_QA[{j}] needs string Q and A")
            pairs.append((p["Q"].strip(), p["A"].strip()))
    return qa


def templated_qa(image_id: str, dx: str, seed: int) -> tuple[str, str]:
    h = stable_hash("ham-template", seed, image_id)
    q = QUESTIONS[h % len(QUESTIONS)]
    a = ANSWERS[(h // len(QUESTIONS)) % len(ANSWERS)]
    return q, a.format(name=DX_NAMES[dx], code=dx.upper())


def _index_images(root: Path) -> dict[str, str]:
    """file stem -> path relative to root (HAM ships images in two part folders)."""
    idx: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file():
            idx.setdefault(p.stem, p.relative_to(root).as_posix())
    return idx


def prepare_ham10000(cfg: HamConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = False) -> dict:
    cfg.validate()
    rows = load_metadata(cfg.metadata)
    qa = load_qa(cfg.qa) if cfg.qa else None
    index = _index_images(Path(cfg.images)) if cfg.images else None

    card = DataCard(
        dataset="ham10000",
        args={k: v for k, v in asdict(cfg).items() if k not in ("metadata", "qa", "images")},
        sources={"metadata": source_info(cfg.metadata), "qa": source_info(cfg.qa)},
        bins={"age_group": HAM_AGE_BINS.to_dict(), "sex": {"male": "M", "female": "F", "unknown": None}},
        attributes=list(ATTRIBUTES),
    )
    card.notes.append(f"splits grouped by lesion_id (images of a lesion stay together), seed {cfg.seed}"
                      + (", stratified by dx" if cfg.stratify else ""))
    card.extra["qa_source"] = "external QA JSON" if qa is not None else "templates"
    if qa is None:
        card.extra["templates"] = {"questions": list(QUESTIONS), "answers": list(ANSWERS), "names": DX_NAMES}

    # a lesion's stratum: its most frequent dx (ties -> alphabetical)
    lesion_dx: dict[str, Counter] = {}
    for r in rows:
        lesion_dx.setdefault(r["lesion_id"], Counter())[r["dx"]] += 1
    strata = {lid: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for lid, c in lesion_dx.items()}
    inconsistent = sum(1 for c in lesion_dx.values() if len(c) > 1)
    if inconsistent:
        card.notes.append(f"{inconsistent} lesion(s) with several dx values; stratified by their most frequent dx")
    split_of = grouped_split(list(strata), cfg.seed, cfg.val_frac, cfg.test_frac,
                             strata=strata if cfg.stratify else None)
    if qa is not None:
        known = {r["image_id"] for r in rows}
        orphan = sum(len(v) for k, v in qa.items() if k not in known)
        if orphan:
            card.drop("QA pair for an image_id not in the metadata", orphan)

    with prepared_output(out_dir, card, overwrite=overwrite) as writer:
        for r in rows:
            attrs = {"sex": r["sex"], "age_group": r["age_group"]}
            missing = [a for a in ATTRIBUTES if attrs[a] is None]
            if missing and cfg.missing == "drop":
                card.drop(f"missing demographics ({','.join(missing)})")
                continue
            if index is not None:
                image = index.get(r["image_id"])
                if image is None:
                    card.drop("image file not found under --images")
                    continue
            else:
                try:
                    image = cfg.image_template.format(image_id=r["image_id"], lesion_id=r["lesion_id"])
                except (KeyError, IndexError) as e:
                    raise FairllavaError(f"--image-template {cfg.image_template!r}: unknown field {e} "
                                         "(available: image_id, lesion_id)") from None
            if qa is not None:
                pairs = qa.get(r["image_id"], [])
                if not pairs:
                    card.drop("no QA pair for image")
                    continue
            else:
                pairs = [templated_qa(r["image_id"], r["dx"], cfg.seed)]
            split = split_of[r["lesion_id"]]
            for k, (q, a) in enumerate(pairs):
                if not q or not a:
                    card.drop("empty question or answer")
                    continue
                rec = {
                    "id": r["image_id"] if qa is None else f"{r['image_id']}_q{k}",
                    "group_id": r["lesion_id"],
                    "image": image,
                    "conversations": conversation("<image>\n" + q, a),
                    "attributes": attrs,
                    "label": r["dx"].upper(),
                    "meta": {"age": r["age"], "image_id": r["image_id"], "lesion_id": r["lesion_id"],
                             "dx_type": r["dx_type"], "localization": r["localization"], "split": split,
                             "source": "ham10000"},
                }
                writer.write(split, rec)
        card.extra["metadata_rows"] = len(rows)
        card.extra["lesions"] = len(strata)
        card.extra["lesions_per_dx"] = {
            s: dict(sorted(Counter(strata[l] for l, sp in split_of.items() if sp == s).items()))
            for s in ("train", "val", "test")
        }
    return card.to_dict()


__all__ = ["HamConfig", "prepare_ham10000", "templated_qa", "DX_CODES", "DX_NAMES"]
