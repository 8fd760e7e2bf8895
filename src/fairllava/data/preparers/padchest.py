"""PadChest findings generation (EVALUATION.md §2.2): PA images, sex and age bins, patient-grouped splits.

Why: PadChest is the paper's second report-generation set and has no race; users hold either the raw
BIMCV CSV (``Report`` in Spanish) or a converted JSON with ``FINDINGS``/``INDICATION`` per ``ImageID``
(joined to the CSV for demographics).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

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
    iter_json_records,
    prepared_output,
    read_csv_checked,
    source_info,
)

ATTRIBUTES = ["sex", "age_group"]
PA_PROJECTIONS = ("PA",)
PA_VIEW_POSITIONS = ("PA", "POSTEROANTERIOR")
SEX_MISSING_MARKERS = ("O",)  # DICOM "other": a recorded non-M/F value, treated as missing (counted)


@dataclass
class PadChestConfig:
    csv: str = ""
    reports: str | None = None  # converted JSON/JSONL with ImageID, FINDINGS, INDICATION
    image_template: str = "{ImageDir}/{ImageID}"
    indication: bool = True
    missing: Literal["drop", "keep"] = "drop"
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1

    def validate(self) -> None:
        if not self.csv:
            raise FairllavaError("--csv: the PadChest CSV is required (demographics and projections)")
        if self.missing not in ("drop", "keep"):
            raise FairllavaError(f"--missing {self.missing!r}: expected drop or keep")
        check_fractions(self.val_frac, self.test_frac)


def _load_reports(path: str) -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for i, obj in iter_json_records(path):
        if not isinstance(obj, dict) or "ImageID" not in obj:
            raise FairllavaError(f"{path}:[{i}]: expected an object with ImageID, FINDINGS, INDICATION")
        f = obj.get("FINDINGS")
        ind = obj.get("INDICATION")
        out[str(obj["ImageID"])] = (f.strip() if isinstance(f, str) else "", ind if isinstance(ind, str) else None)
    return out


def prepare_padchest(cfg: PadChestConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = False) -> dict:
    import pandas as pd

    cfg.validate()
    cols = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
            "Projection", "ViewPosition_DICOM", "Report"]
    needed = ["ImageID", "StudyDate_DICOM", "PatientBirth", "PatientSex_DICOM"] + ([] if cfg.reports else ["Report"])
    df = read_csv_checked(cfg.csv, cols, needed=needed, dtype={"ImageID": "string", "PatientID": "string",
                                                              "StudyID": "string", "PatientSex_DICOM": "string",
                                                              "Projection": "string", "ViewPosition_DICOM": "string",
                                                              "Report": "string", "ImageDir": "string"})
    if "Projection" not in df and "ViewPosition_DICOM" not in df:
        raise FairllavaError(f"{cfg.csv}: needs a Projection or ViewPosition_DICOM column for the PA filter")
    group_col = "PatientID" if "PatientID" in df else "StudyID" if "StudyID" in df else "ImageID"
    reports = _load_reports(cfg.reports) if cfg.reports else None

    # vectorised parsing with located errors
    birth = pd.to_numeric(df["PatientBirth"], errors="coerce")
    date = pd.to_numeric(df["StudyDate_DICOM"], errors="coerce")
    for name, parsed in (("PatientBirth", birth), ("StudyDate_DICOM", date)):
        bad = parsed.isna() & df[name].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise FairllavaError(f"{cfg.csv}:{i + 2}: {name} {df[name].iloc[i]!r} is not a number")
    sex_raw = df["PatientSex_DICOM"].str.strip().str.upper()
    bad = sex_raw.notna() & ~sex_raw.isin(["M", "F", *SEX_MISSING_MARKERS])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise FairllavaError(f"{cfg.csv}:{i + 2}: PatientSex_DICOM {df['PatientSex_DICOM'].iloc[i]!r} (expected M, F or O)")
    if "Projection" in df:
        is_pa = df["Projection"].str.strip().str.upper().isin(PA_PROJECTIONS).fillna(False)
        view_col = df["Projection"]
    else:
        is_pa = df["ViewPosition_DICOM"].str.strip().str.upper().isin(PA_VIEW_POSITIONS).fillna(False)
        view_col = df["ViewPosition_DICOM"]

    card = DataCard(
        dataset="padchest",
        args={k: v for k, v in asdict(cfg).items() if k not in ("csv", "reports")},
        sources={"csv": source_info(cfg.csv), "reports": source_info(cfg.reports)},
        bins={"age_group": MIMIC_AGE_BINS.to_dict(), "age": "year(StudyDate_DICOM) - PatientBirth"},
        attributes=list(ATTRIBUTES),
    )
    card.extra["prompts"] = {"with_indication": PROMPT_WITH_INDICATION, "without_indication": PROMPT_WITHOUT_INDICATION}
    card.notes.append(f"splits grouped by {group_col}, seeded ({cfg.seed}), fractions of groups")
    card.notes.append("PatientSex_DICOM 'O' is treated as missing sex")

    rows = []
    n_rows = len(df)
    image_ids = df["ImageID"].to_numpy()
    groups = df[group_col].to_numpy()
    report_col = df["Report"].to_numpy() if "Report" in df else None
    image_dir = df["ImageDir"].to_numpy() if "ImageDir" in df else None
    pa_arr = is_pa.to_numpy(dtype=bool)
    view_arr = view_col.to_numpy(dtype=object)
    sex_arr = sex_raw.to_numpy(dtype=object)
    birth_arr = birth.to_numpy(dtype=float)
    date_arr = date.to_numpy(dtype=float)
    seen: set[str] = set()
    for i in range(n_rows):
        if not pa_arr[i]:
            card.drop(f"not PA (projection={view_arr[i] if isinstance(view_arr[i], str) else None})")
            continue
        iid = image_ids[i]
        if not isinstance(iid, str) or not iid.strip():
            raise FairllavaError(f"{cfg.csv}:{i + 2}: empty ImageID")
        if iid in seen:
            card.drop("duplicate ImageID")
            continue
        if reports is not None:
            if iid not in reports:
                card.drop("no converted report for ImageID")
                continue
            findings, indication = reports[iid]
        else:
            r = report_col[i]
            findings, indication = (r.strip() if isinstance(r, str) else ""), None
        if not findings:
            card.drop("empty findings")
            continue
        g = groups[i]
        if not isinstance(g, str) or not g.strip():
            card.drop(f"missing {group_col}")
            continue
        seen.add(iid)
        sx = sex_arr[i]
        sex = sx if isinstance(sx, str) and sx in ("M", "F") else None
        age = None
        if not (np.isnan(birth_arr[i]) or np.isnan(date_arr[i])):
            age = float(int(date_arr[i]) // 10000 - int(birth_arr[i]))
        attrs = {"sex": sex, "age_group": age_to_group(age, MIMIC_AGE_BINS, where=f"{cfg.csv}:{i + 2} age")}
        missing = [a for a in ATTRIBUTES if attrs[a] is None]
        if missing and cfg.missing == "drop":
            card.drop(f"missing demographics ({','.join(missing)})")
            continue
        fields = {"ImageID": iid, "ImageDir": image_dir[i] if image_dir is not None else "", "PatientID": g}
        try:
            image = cfg.image_template.format(**fields)
        except (KeyError, IndexError) as e:
            raise FairllavaError(f"--image-template {cfg.image_template!r}: unknown field {e} "
                                 f"(available: {', '.join(fields)})") from None
        rows.append((g, {
            "id": iid,
            "group_id": g,
            "image": image.lstrip("/"),
            "conversations": conversation(findings_prompt(indication, cfg.indication), findings),
            "attributes": attrs,
            "meta": {"age": age, "view": "PA", "source": "padchest"},
        }))
    split_of = grouped_split([g for g, _ in rows], cfg.seed, cfg.val_frac, cfg.test_frac)
    card.extra["csv_rows"] = n_rows
    with prepared_output(out_dir, card, overwrite=overwrite) as writer:
        for g, rec in rows:
            rec["meta"]["split"] = split_of[g]
            writer.write(split_of[g], rec)
    return card.to_dict()
