"""Benchmark: `prepare mimic-cxr` on generated files of the full MIMIC-CXR size (377,110 images).

Generates synthetic LLaVA-Rad-style annotation JSONs (train + test), MIMIC-IV patients/admissions
and MIMIC-CXR-JPG metadata with the real column names, then runs the preparer in a child process
and reports wall seconds and the child's peak RSS. No real data is used.

    python bench/bench_prepare_mimic.py [--images 377110] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the heart size is normal mediastinal contours are stable no focal consolidation pleural effusion "
         "pneumothorax lungs clear mild atelectasis at the bases unchanged compared with prior").split()
RACES = ["WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN - CHINESE", "HISPANIC/LATINO - PUERTO RICAN", "OTHER",
         "UNKNOWN", "WHITE - OTHER EUROPEAN", "AMERICAN INDIAN/ALASKA NATIVE", "PATIENT DECLINED TO ANSWER",
         "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "UNABLE TO OBTAIN", ""]


def generate(d: Path, n_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_subjects = max(10, n_images // 6)  # ~65k subjects for 377k images, as in MIMIC-CXR
    n_patients = int(n_subjects * 4.6)  # MIMIC-IV patients.csv is larger than the CXR cohort (~300k)
    subj = 10_000_000 + np.arange(n_patients)
    t0 = time.time()
    with open(d / "patients.csv", "w") as f:
        f.write("subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n")
        g = rng.choice(["M", "F"], n_patients)
        age = rng.integers(18, 92, n_patients)
        year = rng.integers(2110, 2200, n_patients)
        f.writelines(f"{s},{gg},{a},{y},2008 - 2010,\n" for s, gg, a, y in zip(subj, g, age, year))
    n_adm = int(n_patients * 1.45)  # ~431k admissions
    with open(d / "admissions.csv", "w") as f:
        f.write("subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,"
                "admission_location,discharge_location,insurance,language,marital_status,race,edregtime,"
                "edouttime,hospital_expire_flag\n")
        s = rng.choice(subj, n_adm)
        yr = rng.integers(2110, 2200, n_adm)
        race = rng.choice(len(RACES), n_adm)
        f.writelines(f"{a},{20_000_000 + i},{y}-01-0{1 + i % 9} 10:00:00,,,EW EMER.,P1,ER,HOME,Other,ENGLISH,"
                     f"SINGLE,{RACES[r]},,,0\n" for i, (a, y, r) in enumerate(zip(s, yr, race)))
    img_subj = rng.choice(subj[:n_subjects], n_images)
    views = rng.choice(["PA", "AP", "LATERAL", "LL"], n_images, p=[0.35, 0.3, 0.3, 0.05])
    dicoms = [f"{i:08x}-{int(x):08x}" for i, x in enumerate(rng.integers(0, 2**32, n_images))]
    studies = 50_000_000 + rng.integers(0, 10_000_000, n_images)
    with open(d / "mimic-cxr-2.0.0-metadata.csv", "w") as f:
        f.write("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                "PatientOrientationCodeSequence_CodeMeaning\n")
        study_year = year[img_subj - subj[0]] + rng.integers(0, 6, n_images)
        f.writelines(f"{di},{s},{st},CHEST (PA AND LAT),{v},3056,2544,{sy}0101,101010.000,CHEST,x,Erect\n"
                     for di, s, st, v, sy in zip(dicoms, img_subj, studies, views, study_year))
    # test = subjects in the last 2% of ids, so the given splits are patient-disjoint like LLaVA-Rad's
    is_test = img_subj >= subj[int(n_subjects * 0.98)]
    lengths = rng.integers(10, 60, n_images)
    word_idx = rng.integers(0, len(WORDS), int(lengths.sum()))
    pos = 0
    for split, mask in (("train", ~is_test), ("test", is_test)):
        with open(d / f"chat_{split}_MIMIC_CXR_synthetic.json", "w") as f:
            f.write("[\n")
            first = True
            for i in np.flatnonzero(mask):
                n = int(lengths[i])
                text = " ".join(WORDS[j] for j in word_idx[pos:pos + n]) + "."
                pos += n
                obj = {"id": f"syn-{i}", "image": f"mimic/p{str(img_subj[i])[:2]}/p{img_subj[i]}/s{studies[i]}/{dicoms[i]}.jpg",
                       "generate_method": "rule-based" if i % 3 else "gpt4", "reason": None if i % 2 else "synthetic ___",
                       "view": str(views[i]),
                       "conversations": [{"from": "human", "value": "<image>\nDescribe the findings of the chest x-ray.\n"},
                                         {"from": "gpt", "value": text}],
                       "chexpert_labels": {"No Finding": 1.0}}
                f.write(("" if first else ",\n") + json.dumps(obj))
                first = False
            f.write("\n]\n")
    sizes = {p.name: p.stat().st_size for p in d.iterdir()}
    return {"generate_seconds": round(time.time() - t0, 1), "bytes": sizes}


CHILD = """
import json, resource, sys, time
from fairllava.data.preparers.mimic_cxr import MimicConfig, prepare_mimic_cxr
d, out = sys.argv[1], sys.argv[2]
t = time.time()
card = prepare_mimic_cxr(MimicConfig(annotations=[f"train={d}/chat_train_MIMIC_CXR_synthetic.json",
                                                  f"test={d}/chat_test_MIMIC_CXR_synthetic.json"],
                                     patients=f"{d}/patients.csv", admissions=f"{d}/admissions.csv",
                                     metadata=f"{d}/mimic-cxr-2.0.0-metadata.csv", age_source=sys.argv[3]), out)
print(json.dumps({"seconds": round(time.time() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "annotations_read": card["annotations_read"], "records": card["total_records"],
                  "per_split": {s: v["records"] for s, v in card["splits"].items()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=377_110)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--age-source", default="study", choices=["anchor", "study"])
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_mimic_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        gen = generate(work, args.images)
        print(json.dumps({"generated": gen}), flush=True)
        r = subprocess.run([sys.executable, "-c", CHILD, str(work), str(work / "out"), args.age_source],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res.update(images=args.images, cpu_count=os.cpu_count())
        print(json.dumps(res, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    _ = resource  # parent RSS is not the measurement; the child's is


if __name__ == "__main__":
    main()
