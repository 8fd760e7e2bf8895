"""Preparers on fixture files with the real column names: expected records, bins, counts, grouped
splits; malformed inputs give located errors and write nothing."""
import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fairllava.data.preparers.common import grouped_split, hash_split
from fairllava.data.preparers.ham10000 import HamConfig, prepare_ham10000
from fairllava.data.preparers.iu_xray import IUConfig, prepare_iu_xray, sex_from_indication
from fairllava.data.preparers.mimic_cxr import MimicConfig, parse_image_path, prepare_mimic_cxr
from fairllava.data.preparers.padchest import PadChestConfig, prepare_padchest
from fairllava.data.validate import validate_dataset
from fairllava.errors import FairllavaError

FIX = Path(__file__).parent / "fixtures"
M = FIX / "mimic"
H = FIX / "ham"


def read(out, split):
    return [json.loads(l) for l in (Path(out) / f"{split}.jsonl").read_text().splitlines()]


def all_records(out):
    return {s: read(out, s) for s in ("train", "val", "test")}


def assert_no_group_leak(out, *keys):
    recs = all_records(out)
    for key in ("group_id",) + keys:
        seen = {}
        for s, rows in recs.items():
            for r in rows:
                v = r[key] if key in r else r["meta"][key]
                assert seen.setdefault(v, s) == s, f"{key} {v} in {seen[v]} and {s}"


def assert_nothing_written(out):
    out = Path(out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def mimic_cfg(**kw):
    base = dict(annotations=[f"train={M / 'chat_train_MIMIC_CXR_synthetic.json'}",
                             f"test={M / 'chat_test_MIMIC_CXR_synthetic.json'}"],
                patients=str(M / "patients.csv"), admissions=str(M / "admissions.csv"),
                metadata=str(M / "mimic-cxr-2.0.0-metadata.csv"))
    base.update(kw)
    return MimicConfig(**base)


# ----------------------------------------------------------------------------------------- MIMIC
def test_mimic_expected_records(tmp_path):
    card = prepare_mimic_cxr(mimic_cfg(), tmp_path / "out")
    recs = all_records(tmp_path / "out")
    assert [r["id"] for r in recs["train"]] == ["aaa1", "bbb1"] and recs["val"] == []
    assert [r["id"] for r in recs["test"]] == ["ccc2", "fff2"]
    a, b = recs["train"]
    # earliest admittime wins (the reference's first row would give White)
    assert a["attributes"] == {"sex": "F", "age_group": "0-44", "race": "Black"}
    assert b["attributes"] == {"sex": "M", "age_group": "45-65", "race": "Hispanic"}
    assert a["group_id"] == "10000001" and a["meta"]["study_id"] == "50000001"
    assert a["image"] == "mimic/p10/p10000001/s50000001/aaa1.jpg"
    assert a["conversations"][0]["value"] == ("<image>\nProvide a description of the findings in the radiology image "
                                              "given the following indication: Synthetic indication ___ cough")
    assert b["conversations"][0]["value"] == "<image>\nProvide a description of the findings in the radiology image."
    assert a["conversations"][1]["value"] == "Synthetic finding sentence one."
    # anchor_age 91 -> 66+; PATIENT DECLINED -> Unknown; an empty race string at the earliest admission -> Unknown
    assert [r["attributes"] for r in recs["test"]] == [{"sex": "F", "age_group": "66+", "race": "Unknown"},
                                                       {"sex": "M", "age_group": "45-65", "race": "Unknown"}]
    assert card["dropped"] == {
        "empty findings": 1, "missing demographics (race)": 1, "missing demographics (sex,age_group,race)": 1,
        "not frontal (view=LATERAL)": 1, "subject also in the test split (leak removed from train)": 1,
        "test: generate_method is not rule-based": 1}
    assert card["splits"]["train"]["attributes"]["race"] == {"Black": 1, "Hispanic": 1}
    assert card["bins"]["age_group"]["edges"] == [44, 65] and card["bins"]["age_group"]["right_closed"]
    saved = json.loads((tmp_path / "out" / "datacard.json").read_text())
    assert saved["total_records"] == 4 and saved["total_dropped"] == 6
    assert_no_group_leak(tmp_path / "out")
    assert validate_dataset([tmp_path / "out" / f"{s}.jsonl" for s in ("train", "val", "test")],
                            image_check="none").ok


def test_mimic_options(tmp_path):
    prepare_mimic_cxr(mimic_cfg(age_source="study", race_rule="most-frequent", indication=False), tmp_path / "o")
    recs = all_records(tmp_path / "o")
    assert recs["train"][0]["attributes"]["race"] == "White"  # 2 White admissions vs 1 Black
    assert recs["train"][1]["meta"]["age"] == 53  # 50 + 2163 - 2160
    assert recs["test"][1]["attributes"] == {"sex": "M", "age_group": "66+", "race": "Asian"}  # 65 + 2 -> 67
    assert all(r["conversations"][0]["value"].endswith("in the radiology image.") for s in recs.values() for r in s)
    card = prepare_mimic_cxr(mimic_cfg(missing="keep", annotations=[str(M / "chat_train_MIMIC_CXR_synthetic.json"),
                                                                   str(M / "chat_test_MIMIC_CXR_synthetic.json")]),
                             tmp_path / "pooled")
    recs = all_records(tmp_path / "pooled")
    ids = {r["id"]: r for s in recs.values() for r in s}
    assert ids["eee1"]["attributes"] == {"sex": None, "age_group": None, "race": None}  # kept, masked later
    assert card["total_records"] == sum(len(v) for v in recs.values())
    assert_no_group_leak(tmp_path / "pooled")
    for s, rows in recs.items():
        for r in rows:
            assert hash_split(r["group_id"], 0, 0.1, 0.1) == s


def test_parse_image_path():
    assert parse_image_path("files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg") == (10000032, 50414267,
                                                                                      "02aa804e-bde0afdd")
    with pytest.raises(ValueError):
        parse_image_path("images/10000032.jpg")


def _copy(tmp_path, name, edit):
    src = M / name
    dst = tmp_path / "in" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(edit(src.read_text()))
    return str(dst)


MIMIC_BAD = [
    ("unknown_race", "admissions.csv", lambda t: t.replace("ASIAN - CHINESE", "MARTIAN"), "admissions",
     r"admissions.csv:7: race 'MARTIAN' matches no race rule"),
    ("age_abc", "patients.csv", lambda t: t.replace("10000002,M,50", "10000002,M,abc"), "patients",
     r"patients.csv:3: anchor_age 'abc' is not a number"),
    ("gender_x", "patients.csv", lambda t: t.replace("10000002,M,50", "10000002,X,50"), "patients",
     r"patients.csv:3: gender 'X' \(expected M or F\)"),
    ("dup_subject", "patients.csv", lambda t: t + "10000001,F,30,2150,2008 - 2010,\n", "patients",
     r"duplicate subject_id 10000001"),
    ("no_race_column", "admissions.csv", lambda t: t.replace(",race,", ",colour,"), "admissions",
     r"missing column race \(or ethnicity"),
    ("bad_json", "chat_train_MIMIC_CXR_synthetic.json", lambda t: t.replace('"view": "AP"', '"view": AP', 1),
     "train", r"chat_train_MIMIC_CXR_synthetic.json:\d+: invalid JSON"),
    ("bad_path", "chat_train_MIMIC_CXR_synthetic.json", lambda t: t.replace("p10/p10000002/s50000003/", "x/"),
     "train", r"\[2\] \(id=synthetic-3\): image path .* does not end in p<subject_id>/s<study_id>"),
]


@pytest.mark.parametrize("name,file,edit,slot,msg", MIMIC_BAD, ids=[c[0] for c in MIMIC_BAD])
def test_mimic_malformed_inputs_write_nothing(tmp_path, name, file, edit, slot, msg):
    path = _copy(tmp_path, file, edit)
    kw = {}
    if slot in ("patients", "admissions"):
        kw[slot] = path
    else:
        kw["annotations"] = [f"train={path}", f"test={M / 'chat_test_MIMIC_CXR_synthetic.json'}"]
    with pytest.raises(FairllavaError, match=msg):
        prepare_mimic_cxr(mimic_cfg(**kw), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_mimic_argument_errors_and_overwrite(tmp_path):
    with pytest.raises(FairllavaError, match="--age-source study needs --metadata"):
        prepare_mimic_cxr(mimic_cfg(age_source="study", metadata=None), tmp_path / "out")
    with pytest.raises(FairllavaError, match="file not found"):
        prepare_mimic_cxr(mimic_cfg(patients=str(tmp_path / "nope.csv")), tmp_path / "out")
    with pytest.raises(FairllavaError, match="unknown split 'trian'"):
        prepare_mimic_cxr(mimic_cfg(annotations=["trian=x.json"]), tmp_path / "out")
    prepare_mimic_cxr(mimic_cfg(), tmp_path / "out")
    before = (tmp_path / "out" / "train.jsonl").read_text()
    with pytest.raises(FairllavaError, match="already exists"):
        prepare_mimic_cxr(mimic_cfg(), tmp_path / "out")
    bad = _copy(tmp_path, "patients.csv", lambda t: t.replace("10000002,M,50", "10000002,M,abc"))
    with pytest.raises(FairllavaError):
        prepare_mimic_cxr(mimic_cfg(patients=bad), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "train.jsonl").read_text() == before  # a failed overwrite keeps the old output
    # everything filtered -> error, nothing written
    empty = _copy(tmp_path, "chat_test_MIMIC_CXR_synthetic.json", lambda t: t.replace('"PA"', '"LL"').replace('"AP"', '"LL"'))
    with pytest.raises(FairllavaError, match="no records left"):
        prepare_mimic_cxr(mimic_cfg(annotations=[empty]), tmp_path / "out2")
    assert_nothing_written(tmp_path / "out2")


def test_cli_prepare_mimic(tmp_path):
    from fairllava.cli import app

    r = CliRunner().invoke(app, ["prepare", "mimic-cxr",
                                 "--annotations", f"train={M / 'chat_train_MIMIC_CXR_synthetic.json'}",
                                 "--annotations", f"test={M / 'chat_test_MIMIC_CXR_synthetic.json'}",
                                 "--patients", str(M / "patients.csv"), "--admissions", str(M / "admissions.csv"),
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert len(read(tmp_path / "o", "train")) == 2


# ----------------------------------------------------------------------------------------- PadChest
PADCHEST_HEADER = (",ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
                   "ViewPosition_DICOM,Projection,MethodProjection,Pediatric,Modality_DICOM,ReportID,Report,Labels")


def padchest_csv(tmp_path, rows=None):
    rows = rows or [
        "0,img1.png,0,20140915,st1,pat1,1930.0,F,POSTEROANTERIOR,PA,Manual,No,CR,1,synthetic findings uno,['normal']",
        "1,img2.png,0,20150914,st2,pat2,1980.0,M,LATERAL,L,Manual,No,CR,2,synthetic findings dos,['normal']",
        "2,img3.png,1,20150914,st2,pat2,1980.0,M,POSTEROANTERIOR,PA,Manual,No,CR,2,synthetic findings tres,['normal']",
        "3,img4.png,1,20160101,st3,pat3,,O,POSTEROANTERIOR,PA,Manual,No,CR,3,synthetic findings cuatro,['normal']",
        "4,img5.png,2,20160101,st4,pat4,1950.0,F,POSTEROANTERIOR,PA,Manual,No,CR,4,,['normal']",
        "5,img6.png,2,20170101,st5,pat1,1930.0,F,POSTEROANTERIOR,PA,Manual,No,CR,5,synthetic findings seis,['normal']",
    ]
    p = tmp_path / "PADCHEST_synthetic.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write(PADCHEST_HEADER + "\n" + "\n".join(rows) + "\n")
    return p


def test_padchest_expected(tmp_path):
    card = prepare_padchest(PadChestConfig(csv=str(padchest_csv(tmp_path)), val_frac=0.0, test_frac=0.4),
                            tmp_path / "out")
    recs = {r["id"]: r for rows in all_records(tmp_path / "out").values() for r in rows}
    assert set(recs) == {"img1.png", "img3.png", "img6.png"}
    assert recs["img1.png"]["attributes"] == {"sex": "F", "age_group": "66+"}  # 2014 - 1930 = 84
    assert recs["img3.png"]["attributes"] == {"sex": "M", "age_group": "0-44"}  # 35
    assert recs["img3.png"]["image"] == "1/img3.png" and recs["img3.png"]["group_id"] == "pat2"
    assert card["dropped"] == {"not PA (projection=L)": 1, "missing demographics (sex,age_group)": 1,
                               "empty findings": 1}
    assert_no_group_leak(tmp_path / "out")
    # the converted JSON supplies findings + indication
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"ImageID": "img1.png", "FINDINGS": "Synthetic english findings.",
                                 "INDICATION": "synthetic cough"}]))
    card = prepare_padchest(PadChestConfig(csv=str(padchest_csv(tmp_path)), reports=str(conv)), tmp_path / "o2")
    rows = [r for rs in all_records(tmp_path / "o2").values() for r in rs]
    assert len(rows) == 1 and rows[0]["conversations"][1]["value"] == "Synthetic english findings."
    assert rows[0]["conversations"][0]["value"].endswith("following indication: synthetic cough")
    assert card["dropped"]["no converted report for ImageID"] == 4  # PA rows img3..img6


@pytest.mark.parametrize("row,msg", [
    ("0,img1.png,0,20140915,st1,pat1,abc,F,POSTEROANTERIOR,PA,M,No,CR,1,x,[]", r":2: PatientBirth 'abc' is not a number"),
    ("0,img1.png,0,2014-09-15,st1,pat1,1930,F,POSTEROANTERIOR,PA,M,No,CR,1,x,[]", r":2: StudyDate_DICOM '2014-09-15'"),
    ("0,img1.png,0,20140915,st1,pat1,1930,X,POSTEROANTERIOR,PA,M,No,CR,1,x,[]", r":2: PatientSex_DICOM 'X'"),
    ("0,img1.png,0,20140915,st1,pat1,2020,F,POSTEROANTERIOR,PA,M,No,CR,1,x,[]", r":2 age: age -6"),
])
def test_padchest_malformed(tmp_path, row, msg):
    with pytest.raises(FairllavaError, match=msg):
        prepare_padchest(PadChestConfig(csv=str(padchest_csv(tmp_path, [row]))), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------------------- HAM10000
def test_ham_templates_bins_and_lesion_split(tmp_path):
    card = prepare_ham10000(HamConfig(metadata=str(H / "HAM10000_metadata.csv"), val_frac=0.2, test_frac=0.2,
                                      seed=3), tmp_path / "out")
    recs = {r["id"]: r for rows in all_records(tmp_path / "out").values() for r in rows}
    assert len(recs) == 25 and card["total_records"] == 25 and card["dropped"] == {}
    # HAM bins: <45 | 45-65 | >=66 ; 44 -> 0-44, 45 -> 45-65, 65 -> 45-65, 66 -> 66+, 5 -> 0-44
    expect = {"ISIC_9027190": "0-44", "ISIC_9024981": "45-65", "ISIC_9029577": "45-65", "ISIC_9032009": "66+",
              "ISIC_9025452": "0-44", "ISIC_9030421": None}
    assert {k: recs[k]["attributes"]["age_group"] for k in expect} == expect
    assert recs["ISIC_9030421"]["attributes"]["sex"] is None  # "unknown" -> missing, kept for task metrics
    assert recs["ISIC_9025767"]["label"] == "MEL" and recs["ISIC_9025767"]["group_id"] == "HAM_9001949"
    for r in recs.values():
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.startswith("<image>\n") and f"({r['label']})" in a
    assert len({r["conversations"][0]["value"] for r in recs.values()}) > 1  # several templates used
    assert_no_group_leak(tmp_path / "out", "lesion_id", "image_id")
    # same seed -> same split; different seed -> different split
    prepare_ham10000(HamConfig(metadata=str(H / "HAM10000_metadata.csv"), val_frac=0.2, test_frac=0.2, seed=3),
                     tmp_path / "again")
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (tmp_path / "out" / "test.jsonl").read_bytes()


def test_ham_stratified_split_keeps_every_class_in_train(tmp_path):
    prepare_ham10000(HamConfig(metadata=str(H / "HAM10000_metadata.csv"), val_frac=0.2, test_frac=0.2),
                     tmp_path / "out")
    assert {r["label"] for r in read(tmp_path / "out", "train")} == {"AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"}


def test_ham_qa_file_and_images(tmp_path):
    from test_data_helpers import write_image

    root = tmp_path / "imgs"
    write_image(root / "HAM10000_images_part_1" / "ISIC_9027419.jpg")
    write_image(root / "HAM10000_images_part_2" / "ISIC_9025767.jpg")
    card = prepare_ham10000(HamConfig(metadata=str(H / "HAM10000_metadata.csv"),
                                      qa=str(H / "selfsynthx_round1_synthetic.json"), images=str(root)),
                            tmp_path / "out")
    recs = {r["id"]: r for rows in all_records(tmp_path / "out").values() for r in rows}
    assert set(recs) == {"ISIC_9027419_q0", "ISIC_9027419_q1", "ISIC_9025767_q0"}
    assert recs["ISIC_9025767_q0"]["image"] == "HAM10000_images_part_2/ISIC_9025767.jpg"
    assert recs["ISIC_9027419_q1"]["conversations"][1]["value"] == "Synthetic answer B."
    assert card["dropped"]["QA pair for an image_id not in the metadata"] == 1
    assert card["dropped"]["image file not found under --images"] == 23
    out = tmp_path / "out"
    assert validate_dataset([out / f"{s}.jsonl" for s in ("train", "val", "test")], root).ok
    assert_no_group_leak(out, "lesion_id", "image_id")


HAM_BAD = [
    ("unknown_dx", lambda t: t.replace("ISIC_9029387,df", "ISIC_9029387,xyz"), r":25 \(image_id=ISIC_9029387\): dx 'xyz'"),
    ("age_abc", lambda t: t.replace("ISIC_9029387,df,consensus,55.0", "ISIC_9029387,df,consensus,abc"),
     r":25 \(image_id=ISIC_9029387\) age: expected a number, got 'abc'"),
    ("sex_x", lambda t: t.replace("55.0,male,lower", "55.0,mle,lower"), r":25 \(image_id=ISIC_9029387\): sex 'mle'"),
    ("dup_image", lambda t: t + "HAM_9,ISIC_9029387,df,histo,50,male,back,x\n", r":27: duplicate image_id 'ISIC_9029387'"),
    ("missing_column", lambda t: t.replace("lesion_id,", "lesion,", 1), r"missing column\(s\) lesion_id"),
    ("empty_lesion", lambda t: t.replace("HAM_9006002,", ",", 1), r":25: empty lesion_id"),
]


@pytest.mark.parametrize("name,edit,msg", HAM_BAD, ids=[c[0] for c in HAM_BAD])
def test_ham_malformed(tmp_path, name, edit, msg):
    p = tmp_path / "HAM10000_metadata.csv"
    p.write_text(edit((H / "HAM10000_metadata.csv").read_text()))
    with pytest.raises(FairllavaError, match=msg):
        prepare_ham10000(HamConfig(metadata=str(p)), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_ham_bad_qa_json(tmp_path):
    q = tmp_path / "qa.json"
    q.write_text('[{"image_id": "ISIC_9027419", "new_QA": [{"Q": "x"}]}]')
    with pytest.raises(FairllavaError, match=r"qa.json:\[0\] \(image_id=ISIC_9027419\): new_QA\[0\] needs string Q and A"):
        prepare_ham10000(HamConfig(metadata=str(H / "HAM10000_metadata.csv"), qa=str(q)), tmp_path / "out")
    q.write_text('[{"image_id": "ISIC_9027419", "new_QA": []},, ]')
    with pytest.raises(FairllavaError, match=r"qa.json:1: invalid JSON"):
        prepare_ham10000(HamConfig(metadata=str(H / "HAM10000_metadata.csv"), qa=str(q)), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------------------- IU X-ray
def _xml(n, findings, indication, images, doctype=False):
    secs = "".join(f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in
                   (("COMPARISON", "None."), ("INDICATION", indication), ("FINDINGS", findings), ("IMPRESSION", "x")))
    ims = "".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in images)
    head = '<?xml version="1.0" encoding="utf-8"?>' + ('<!DOCTYPE x [<!ENTITY a "b">]>' if doctype else "")
    return (f'{head}<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>{secs}</Abstract></Article>'
            f'</MedlineCitation><MeSH><major>normal</major></MeSH>{ims}</eCitation>').encode()


def iu_dir(tmp_path, reports=None, meta_rows=None):
    d = tmp_path / "iu"
    d.mkdir(exist_ok=True)
    reports = reports if reports is not None else [
        (1, "Synthetic clear lungs.", "Synthetic: 45-year-old female with cough", ["CXR1_IM-0001-1001", "CXR1_IM-0001-2001"]),
        (2, "Synthetic normal heart.", "Synthetic male smoker", ["CXR2_IM-0002-1001"]),
        (3, "", "Synthetic woman", ["CXR3_IM-0003-1001"]),
        (4, "Synthetic stable.", "Synthetic female and male twins", ["CXR4_IM-0004-1001"]),
        (5, "Synthetic no effusion.", "Synthetic XXXX pain", []),
        (10, "Synthetic boy.", "Synthetic boy, 5 y/o", ["CXR10_IM-0010-1001"]),
    ]
    with tarfile.open(d / "NLMCXR_reports.tgz", "w:gz") as tf:
        for n, f, ind, ims, *dt in reports:
            data = _xml(n, f, ind, ims, doctype=bool(dt))
            info = tarfile.TarInfo(f"ecgen-radiology/{n}.xml")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    meta_rows = meta_rows if meta_rows is not None else [
        ("CXR1_IM-0001-1001", "19600510", "20000509", "LL", "1"),   # 39 (birthday tomorrow)
        ("CXR1_IM-0001-2001", "19600510", "20000510", "PA", "1"),
        ("CXR2_IM-0002-1001", "19300101", "20000101", "AP", "2"),   # 70
        ("CXR3_IM-0003-1001", "19500101", "20000101", "PA", "3"),
        ("CXR4_IM-0004-1001", "", "20000101", "", "4"),             # no birth date -> age missing
        ("CXR10_IM-0010-1001", "19950101", "20000101", "PA", "10"),  # 5
    ]
    with gzip.open(d / "nlmcxr_dicom_metadata.csv.gz", "wt", newline="") as f:
        f.write("imageid,Patient ID,Patient's Birth Date,Patient's Sex,Study Date,View Position\n")
        for im, b, s, v, pid in meta_rows:
            f.write(f"{im},{pid},{b},,{s},{v}\n")
    return d


def test_iu_sex_regex():
    assert sex_from_indication("72-year-old female") == "F"
    assert sex_from_indication("Male with chest pain") == "M"
    assert sex_from_indication("woman; man") is None and sex_from_indication("XXXX pain") is None
    assert sex_from_indication("manifest humanity") is None  # word boundaries


def test_iu_synthetic(tmp_path):
    d = iu_dir(tmp_path)
    card = prepare_iu_xray(IUConfig(data_dir=str(d), val_frac=0.0, test_frac=0.0), tmp_path / "out")
    recs = {r["id"]: r for r in read(tmp_path / "out", "train")}
    assert set(recs) == {"CXR1", "CXR2", "CXR4", "CXR10"}  # 3: empty findings; 5: no image id for the template
    assert recs["CXR1"]["attributes"] == {"sex": "F", "age_group": "0-44"} and recs["CXR1"]["meta"]["age"] == 39
    assert recs["CXR1"]["image"] == "CXR1_IM-0001-2001.png"  # first frontal image
    assert recs["CXR2"]["attributes"] == {"sex": "M", "age_group": "66+"}
    assert recs["CXR4"]["attributes"] == {"sex": None, "age_group": None}
    assert recs["CXR10"]["attributes"] == {"sex": "M", "age_group": "0-44"}
    assert recs["CXR1"]["conversations"][0]["value"] == ("<image>\nProvide a description of the findings in the "
                                                         "radiology image.")  # indication off by default
    assert card["dropped"] == {"empty findings": 1, "no linked image id (template needs {image_id})": 1}
    s = card["source_stats"]
    assert (s["reports"], s["findings_nonempty"], s["age"], s["sex"], s["frontal"]) == (6, 5, 4, 4, 4)
    text_only = prepare_iu_xray(IUConfig(data_dir=str(d), with_image=False, missing="drop"), tmp_path / "t")
    rows = [r for rs in all_records(tmp_path / "t").values() for r in rs]
    assert {r["id"] for r in rows} == {"CXR1", "CXR2", "CXR10"} and all("image" not in r for r in rows)
    assert all("<image>" not in r["conversations"][0]["value"] for r in rows)
    assert text_only["dropped"]["missing demographics (sex,age_group)"] == 2
    assert_no_group_leak(tmp_path / "t")


def test_iu_malformed(tmp_path):
    d = iu_dir(tmp_path, reports=[(1, "x", "y", ["a"], True)])
    with pytest.raises(FairllavaError, match="DOCTYPE/ENTITY declarations are not accepted"):
        prepare_iu_xray(IUConfig(data_dir=str(d)), tmp_path / "out")
    with pytest.raises(FairllavaError, match="NLMCXR_reports.tgz: file not found"):
        prepare_iu_xray(IUConfig(data_dir=str(tmp_path)), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def _iu_wheel_dir():
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None
    d = Path(os.path.dirname(spec.origin)) / "data"
    return d if (d / "NLMCXR_reports.tgz").is_file() else None


@pytest.mark.skipif(_iu_wheel_dir() is None, reason="torchxrayvision wheel (IU X-ray data) not installed")
def test_iu_real_wheel_measured_counts(tmp_path):
    """EVALUATION.md §2.4 measured counts; the output stays in tmp_path (licence: never committed)."""
    card = prepare_iu_xray(IUConfig(), tmp_path / "out")
    s = card["source_stats"]
    assert s["reports"] == 3955 and s["findings_nonempty"] == 3425 and s["frontal"] == 2561
    assert s["age"] == 3850 and (s["age_min"], s["age_max"]) == (17, 99) and abs(s["age_mean"] - 50) < 1
    assert (s["age_group 0-44"], s["age_group 45-65"], s["age_group 66+"]) == (1403, 1745, 702)
    assert (s["sex"], s["sex F"], s["sex M"], s["age_and_sex"]) == (1160, 683, 477, 1140)
    assert_no_group_leak(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")


# ----------------------------------------------------------------------------------------- splits
def test_grouped_split_properties():
    groups = [f"g{i}" for i in range(1000)]
    a = grouped_split(groups, seed=1)
    assert a == grouped_split(list(reversed(groups)), seed=1)  # order-independent
    assert a != grouped_split(groups, seed=2)
    counts = {s: sum(1 for v in a.values() if v == s) for s in ("train", "val", "test")}
    assert counts == {"train": 800, "val": 100, "test": 100}
    strata = {g: ("rare" if i < 20 else "common") for i, g in enumerate(groups)}
    b = grouped_split(groups, 0, strata=strata)
    rare = [b[g] for g in groups[:20]]
    assert rare.count("test") == 2 and rare.count("val") == 2
    with pytest.raises(FairllavaError):
        grouped_split(groups, 0, 0.5, 0.5)


def test_iu_options(tmp_path):
    d = iu_dir(tmp_path)
    card = prepare_iu_xray(IUConfig(data_dir=str(d), require_frontal=True, indication=True,
                                    image_template="{report_id}/{n}.png"), tmp_path / "out")
    rows = {r["id"]: r for rs in all_records(tmp_path / "out").values() for r in rs}
    assert card["dropped"] == {"empty findings": 1, "no PA/AP image": 2}  # CXR4 (no view), CXR5 (no image)
    assert rows["CXR2"]["image"] == "CXR2/2.png"
    assert rows["CXR2"]["conversations"][0]["value"].endswith("following indication: Synthetic male smoker")


def test_cli_error_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "HAM10000_metadata.csv"
    p.write_text((H / "HAM10000_metadata.csv").read_text().replace("ISIC_9029387,df", "ISIC_9029387,xyz"))
    r = subprocess.run([sys.executable, "-m", "fairllava", "prepare", "ham10000", "--metadata", str(p),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "HAM10000_metadata.csv:25 (image_id=ISIC_9029387): dx 'xyz'" in lines[0]
    assert_nothing_written(tmp_path / "out")
