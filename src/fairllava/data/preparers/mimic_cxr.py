"""MIMIC-CXR findings generation from the LLaVA-Rad annotations + MIMIC-IV demographics (EVALUATION.md §2.1).

Why: users hold the credentialed raw files, not a fairness-ready set. This joins the LLaVA-Rad
conversation JSON with ``patients``/``admissions`` (and optionally MIMIC-CXR-JPG metadata) on
``subject_id`` parsed from the image path, applies the reference filters and bins, and writes
patient-grouped splits. Annotations are streamed and the CSVs read column-subset (chunked for
admissions), so the full 377k-image set runs in seconds with bounded memory.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ...errors import FairllavaError
from ..attributes import MIMIC_AGE_BINS, RACE8, age_to_group, map_race
from .common import (
    FRONTAL_VIEWS,
    PROMPT_WITH_INDICATION,
    PROMPT_WITHOUT_INDICATION,
    SPLITS,
    DataCard,
    check_fractions,
    conversation,
    findings_prompt,
    hash_split,
    iter_json_records,
    prepared_output,
    progress_bar,
    read_csv_checked,
    require_columns,
    source_info,
)

# .../p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg
_PATH_RE = re.compile(r"(?:^|/)p(\d+)/s(\d+)/([^/]+?)\.(?:jpg|jpeg|png|dcm)$", re.IGNORECASE)
SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}  # a subject in several given splits keeps the first here
ATTRIBUTES = ["sex", "age_group", "race"]


@dataclass
class MimicConfig:
    """Arguments of :func:`prepare_mimic_cxr` (recorded in the datacard)."""

    annotations: list = field(default_factory=list)  # ["train=path", "test=path"] or ["path"] (pooled)
    patients: str = ""
    admissions: str = ""
    metadata: str | None = None
    age_source: Literal["anchor", "study"] = "anchor"
    race_rule: Literal["earliest", "most-frequent"] = "earliest"
    indication: bool = True
    missing: Literal["drop", "keep"] = "drop"
    rule_based_test: bool = True
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1

    def validate(self) -> None:
        if not self.annotations:
            raise FairllavaError("--annotations: give at least one LLaVA-Rad annotation JSON")
        if self.age_source not in ("anchor", "study"):
            raise FairllavaError(f"--age-source {self.age_source!r}: expected anchor or study")
        if self.age_source == "study" and not self.metadata:
            raise FairllavaError("--age-source study needs --metadata mimic-cxr-2.0.0-metadata.csv")
        if self.race_rule not in ("earliest", "most-frequent"):
            raise FairllavaError(f"--race-rule {self.race_rule!r}: expected earliest or most-frequent")
        if self.missing not in ("drop", "keep"):
            raise FairllavaError(f"--missing {self.missing!r}: expected drop or keep")
        check_fractions(self.val_frac, self.test_frac)


def parse_annotation_args(items: Sequence[str]) -> list[tuple[str | None, Path]]:
    """``["train=a.json", "test=b.json"]`` -> [(split, path)]; untagged files are pooled (split by subject)."""
    out: list[tuple[str | None, Path]] = []
    for it in items:
        tag, sep, path = str(it).partition("=")
        if sep and tag in SPLITS:
            out.append((tag, Path(path)))
        elif sep and tag in ("valid", "validation", "dev"):
            out.append(("val", Path(path)))
        elif sep and "/" not in tag and not Path(it).exists():
            raise FairllavaError(f"--annotations {it!r}: unknown split {tag!r} (expected train/val/test=PATH)")
        else:
            out.append((None, Path(it)))
    tagged = [s for s, _ in out if s is not None]
    if tagged and len(tagged) != len(out):
        raise FairllavaError("--annotations: either tag every file with its split (train=..., test=...) or none")
    for _, p in out:
        if not p.is_file():
            raise FairllavaError(f"{p}: file not found")
    return out


def parse_image_path(image: str) -> tuple[int, int, str]:
    """``files/p10/p10000032/s50414267/02aa804e-....jpg`` -> (subject_id, study_id, dicom_id)."""
    m = _PATH_RE.search(str(image).replace("\\", "/"))
    if not m:
        raise ValueError(f"image path {image!r} does not end in p<subject_id>/s<study_id>/<dicom_id>.jpg")
    return int(m.group(1)), int(m.group(2)), m.group(3)


# -- demographics ------------------------------------------------------------------------------------
def load_patients(path: str | Path) -> dict[int, tuple[str | None, float | None, int | None]]:
    """subject_id -> (sex M/F/None, anchor_age, anchor_year). Bad values raise with file:line."""
    import pandas as pd

    df = read_csv_checked(path, ["subject_id", "gender", "anchor_age", "anchor_year"],
                          needed=["subject_id", "gender", "anchor_age"], dtype={"gender": "string"})
    _check_int_column(df, "subject_id", path)
    ages = pd.to_numeric(df["anchor_age"], errors="coerce")
    bad = ages.isna() & df["anchor_age"].notna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise FairllavaError(f"{path}:{i + 2}: anchor_age {df['anchor_age'].iloc[i]!r} is not a number")
    if ((ages < 0) | (ages > 130)).any():
        i = int(np.flatnonzero(((ages < 0) | (ages > 130)).to_numpy())[0])
        raise FairllavaError(f"{path}:{i + 2}: anchor_age {ages.iloc[i]} outside 0..130")
    gender = df["gender"].str.strip().str.upper()
    bad_g = gender.notna() & ~gender.isin(["M", "F", ""])
    if bad_g.any():
        i = int(np.flatnonzero(bad_g.to_numpy())[0])
        raise FairllavaError(f"{path}:{i + 2}: gender {df['gender'].iloc[i]!r} (expected M or F)")
    years = pd.to_numeric(df["anchor_year"], errors="coerce") if "anchor_year" in df else pd.Series(np.nan, index=df.index)
    out: dict[int, tuple] = {}
    for sid, g, a, y in zip(df["subject_id"].to_numpy(), gender.to_numpy(), ages.to_numpy(), years.to_numpy()):
        sid = int(sid)
        if sid in out:
            raise FairllavaError(f"{path}: duplicate subject_id {sid}")
        out[sid] = (g if isinstance(g, str) and g else None,
                    None if np.isnan(a) else float(a),
                    None if np.isnan(y) else int(y))
    return out


def _check_int_column(df, col: str, path) -> None:
    import pandas as pd

    vals = pd.to_numeric(df[col], errors="coerce")
    bad = vals.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise FairllavaError(f"{path}:{i + 2}: {col} {df[col].iloc[i]!r} is not an integer id")
    df[col] = vals.astype("int64")


def load_race(path: str | Path, rule: str = "earliest", chunksize: int = 200_000) -> tuple[dict[int, str], dict]:
    """subject_id -> RACE8 class from admissions (``race`` or MIMIC-IV 1.0 ``ethnicity``).

    ``earliest``: the value at the earliest ``admittime``; ``most-frequent``: the most frequent known
    class (ties and all-unknown fall back to the earliest). Unmapped raw strings raise.
    """
    import pandas as pd

    p = Path(path)
    header = read_csv_checked(p, nrows=0)
    col = "race" if "race" in header.columns else "ethnicity" if "ethnicity" in header.columns else None
    if col is None:
        raise FairllavaError(f"{p}: missing column race (or ethnicity in MIMIC-IV 1.0)")
    require_columns(header.columns, ["subject_id", "admittime"], str(p))
    parts = []
    mapping: dict[str, str] = {}
    line0 = 2
    for chunk in pd.read_csv(p, usecols=["subject_id", "admittime", col], chunksize=chunksize,
                             dtype={col: "string", "admittime": "string"}):
        chunk = chunk.reset_index(drop=True)
        sid = pd.to_numeric(chunk["subject_id"], errors="coerce")
        if sid.isna().any():
            i = int(np.flatnonzero(sid.isna().to_numpy())[0])
            raise FairllavaError(f"{p}:{line0 + i}: subject_id {chunk['subject_id'].iloc[i]!r} is not an integer id")
        raw = chunk[col].fillna("")
        for s in raw.unique():
            if s not in mapping:
                try:
                    mapping[s] = map_race(s, RACE8)
                except FairllavaError:
                    i = int(np.flatnonzero((raw == s).to_numpy())[0])
                    raise FairllavaError(
                        f"{p}:{line0 + i}: {col} {s!r} matches no race rule (EVALUATION.md §2.1); "
                        "extend the mapping table instead of guessing"
                    ) from None
        t = pd.to_datetime(chunk["admittime"], errors="coerce")
        parts.append(pd.DataFrame({"subject_id": sid.astype("int64"), "t": t, "cls": raw.map(mapping)}))
        line0 += len(chunk)
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["subject_id", "t", "cls"])
    df = df.sort_values(["subject_id", "t"], na_position="last", kind="stable")
    earliest = df.drop_duplicates("subject_id", keep="first").set_index("subject_id")["cls"]
    if rule == "earliest":
        result = earliest
    else:
        known = df[df["cls"] != "Unknown"]
        counts = known.groupby(["subject_id", "cls"], sort=False).size().rename("n").reset_index()
        first_t = known.groupby(["subject_id", "cls"], sort=False)["t"].min().reset_index(drop=True)
        counts["t"] = first_t.values
        counts = counts.sort_values(["subject_id", "n", "t"], ascending=[True, False, True], na_position="last")
        best = counts.drop_duplicates("subject_id", keep="first").set_index("subject_id")["cls"]
        result = earliest.copy()
        result.loc[best.index] = best
    stats = {"admission_rows": int(len(df)), "subjects": int(len(result)), "race_column": col,
             "raw_strings": len(mapping)}
    return {int(k): v for k, v in result.items()}, stats


def load_metadata(path: str | Path) -> dict[str, tuple[int | None, str | None]]:
    """dicom_id -> (StudyDate YYYYMMDD, ViewPosition) from mimic-cxr-2.0.0-metadata.csv."""
    import pandas as pd

    df = read_csv_checked(path, ["dicom_id", "StudyDate", "ViewPosition"], needed=["dicom_id", "StudyDate"],
                          dtype={"dicom_id": "string", "ViewPosition": "string"})
    dates = pd.to_numeric(df["StudyDate"], errors="coerce")
    view = df["ViewPosition"] if "ViewPosition" in df else pd.Series([None] * len(df))
    return {d: (None if np.isnan(s) else int(s), v if isinstance(v, str) else None)
            for d, s, v in zip(df["dicom_id"].to_numpy(), dates.to_numpy(), view.to_numpy())}


# -- records ---------------------------------------------------------------------------------------
def _answer(obj: dict) -> str | None:
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        return None
    for turn in conv:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            v = turn.get("value")
            return v.strip() if isinstance(v, str) else None
    return None


def _screen(obj, where: str, meta, cfg: MimicConfig):
    """Row filters shared by both passes: returns ((sid, study, dicom, view, findings), drop_reason|None).
    Structural problems (not an object, no parseable image path) raise."""
    if not isinstance(obj, dict):
        raise FairllavaError(f"{where}: expected an annotation object, got {type(obj).__name__}")
    image = obj.get("image")
    if not isinstance(image, str):
        raise FairllavaError(f"{where} (id={obj.get('id')}): missing 'image' path")
    try:
        sid, study, dicom = parse_image_path(image)
    except ValueError as e:
        raise FairllavaError(f"{where} (id={obj.get('id')}): {e}") from None
    md = meta.get(dicom) if meta is not None else None
    view = obj.get("view") or (md[1] if md else None)
    parsed = (sid, study, dicom, view, _answer(obj))
    if view not in FRONTAL_VIEWS:
        return parsed, f"not frontal (view={view})"
    if not parsed[4]:
        return parsed, "empty findings"
    return parsed, None


def _test_filter(obj: dict, split: str, cfg: MimicConfig) -> str | None:
    """The LLaVA-Rad findings test set keeps only rule-based sections (2,461 reports)."""
    if split == "test" and cfg.rule_based_test and obj.get("generate_method") != "rule-based":
        return "test: generate_method is not rule-based"
    return None


def prepare_mimic_cxr(cfg: MimicConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = False) -> dict:
    """Write ``out_dir/{train,val,test}.jsonl`` + ``datacard.json``; returns the datacard dict."""
    cfg.validate()
    ann = parse_annotation_args(cfg.annotations)
    patients = load_patients(cfg.patients)
    race, race_stats = load_race(cfg.admissions, cfg.race_rule)
    meta = load_metadata(cfg.metadata) if cfg.metadata else None

    pooled = ann[0][0] is None
    subject_split: dict[int, str] = {}
    if not pooled:
        # pass 1: which given splits does each subject really appear in (rows passing the row filters)?
        # A subject in several keeps the highest-priority split (test > val > train).
        for split, path in ann:
            for i, obj in iter_json_records(path):
                parsed, reason = _screen(obj, f"{path}:[{i}]", meta, cfg)
                if reason is None and _test_filter(obj, split, cfg) is None:
                    sid = parsed[0]
                    cur = subject_split.get(sid)
                    if cur is None or SPLIT_PRIORITY[split] < SPLIT_PRIORITY[cur]:
                        subject_split[sid] = split

    card = DataCard(
        dataset="mimic-cxr",
        args={k: v for k, v in asdict(cfg).items() if k not in ("annotations", "patients", "admissions", "metadata")},
        sources={"annotations": [dict(source_info(p), split=s) for s, p in ann],
                 "patients": source_info(cfg.patients), "admissions": source_info(cfg.admissions),
                 "metadata": source_info(cfg.metadata)},
        bins={"age_group": MIMIC_AGE_BINS.to_dict(), "age_source": cfg.age_source,
              "race": {"vocabulary": "race8", "classes": RACE8.classes, "rule": cfg.race_rule}},
        attributes=list(ATTRIBUTES),
    )
    card.extra["prompts"] = {"with_indication": PROMPT_WITH_INDICATION, "without_indication": PROMPT_WITHOUT_INDICATION}
    card.extra["race_join"] = race_stats
    card.notes.append("splits grouped by subject_id (parsed from the image path)"
                      + ("; given splits, subjects in several keep test > val > train" if not pooled
                         else f"; pooled annotations split by stable hash (seed {cfg.seed})"))
    seen_images: set[str] = set()
    n_in = 0

    prog = progress_bar(progress)
    with prepared_output(out_dir, card, overwrite=overwrite) as writer, prog as bar:
        task = bar.add_task("mimic-cxr", total=None) if bar is not None else None
        for given_split, path in ann:
            for i, obj in iter_json_records(path):
                n_in += 1
                if bar is not None and n_in % 5000 == 0:
                    bar.update(task, completed=n_in)
                where = f"{path}:[{i}]"
                parsed, reason = _screen(obj, where, meta, cfg)
                split = given_split if not pooled else hash_split(str(parsed[0]), cfg.seed, cfg.val_frac, cfg.test_frac)
                reason = reason or _test_filter(obj, split, cfg)
                if reason is not None:
                    card.drop(reason)
                    continue
                sid, study, dicom, view, findings = parsed
                if not pooled and subject_split[sid] != given_split:
                    card.drop(f"subject also in the {subject_split[sid]} split (leak removed from {given_split})")
                    continue
                md = meta.get(dicom) if meta is not None else None
                if dicom in seen_images:
                    card.drop("duplicate image")
                    continue
                seen_images.add(dicom)
                sex, age, anchor_year = patients.get(sid, (None, None, None))
                if age is not None and cfg.age_source == "study":
                    date = md[0] if md else None
                    if date is None or anchor_year is None:
                        age = None  # counted; the row then follows the missing-demographics policy
                        card.extra["study_age_unavailable"] = card.extra.get("study_age_unavailable", 0) + 1
                    else:
                        age = age + date // 10000 - anchor_year
                        if not 0 <= age <= 130:  # inconsistent date shifts between the databases
                            age = None
                            card.extra["study_age_implausible"] = card.extra.get("study_age_implausible", 0) + 1
                attrs = {
                    "sex": sex,
                    "age_group": age_to_group(age, MIMIC_AGE_BINS, where=f"{where} age"),
                    "race": race.get(sid),
                }
                missing = [a for a in ATTRIBUTES if attrs[a] is None]
                if missing and cfg.missing == "drop":
                    card.drop(f"missing demographics ({','.join(missing)})")
                    continue
                reason = obj.get("reason")
                rec = {
                    "id": dicom,
                    "group_id": str(sid),
                    "image": obj["image"],
                    "conversations": conversation(findings_prompt(reason, cfg.indication), findings),
                    "attributes": attrs,
                    "meta": {"age": age, "view": view, "study_id": str(study), "split": split,
                             "has_indication": bool(reason and str(reason).strip()),
                             "generate_method": obj.get("generate_method"), "source": "mimic-cxr"},
                }
                writer.write(split, rec)
        card.extra["annotations_read"] = n_in
    return card.to_dict()
