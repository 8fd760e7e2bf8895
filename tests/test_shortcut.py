"""The shortcut benchmark: S controls the train skew, test is balanced, runs are byte-identical,
and both groups carry the same visual evidence."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fairllava.benchmark import cxr, derm, evidence, prepare, rendering
from fairllava.data.preparers import shortcut as sc
from fairllava.errors import FairllavaError
from fairllava.io import read_jsonl

SMALL = dict(n_train=120, n_val_per_cell=2, n_test_per_cell=6, image_size=48, evidence_probe=False, progress=False)


def _table(rows: list[dict]) -> Counter:
    return Counter((r["attributes"]["race"], r["label"]) for r in rows)


@pytest.fixture(scope="module")
def derm_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("derm")
    out = {}
    for s in (0.0, 0.5, 1.0):
        d = base / f"s{s}"
        sc.prepare_shortcut("derm-vqa", d, seed=3, strength=s, **SMALL)
        out[s] = d
    return out


def test_train_table_follows_strength(derm_runs):
    shares = {}
    for s, d in derm_runs.items():
        t = _table(read_jsonl(d / "train.jsonl"))
        n_dark = sum(v for (g, _), v in t.items() if g == "dark")
        n_light = sum(v for (g, _), v in t.items() if g == "light")
        assert n_dark == round(120 * 0.3) and n_light == 120 - n_dark
        # majority stays uniform at every S
        assert {t[("light", c)] for c in sc.DERM_LABELS} == {n_light // 3}
        shares[s] = t[("dark", "MEL")] / n_dark
    assert abs(shares[0.0] - 1 / 3) < 0.02  # S = 0: label independent of group
    assert abs(shares[1.0] - 0.85) < 0.02  # S = 1: the BENCHMARK-NOTES setting
    assert shares[0.0] < shares[0.5] < shares[1.0]
    assert abs(shares[0.5] - (1 / 3 + 0.5 * (0.85 - 1 / 3))) < 0.02


def test_val_test_balanced_and_grouped(derm_runs):
    d = derm_runs[1.0]
    splits = {s: read_jsonl(d / f"{s}.jsonl") for s in sc.SPLITS}
    for split, per in (("val", 2), ("test", 6)):
        t = _table(splits[split])
        assert set(t.values()) == {per} and len(t) == 6
    groups = {s: {r["group_id"] for r in rows} for s, rows in splits.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert not (groups["val"] & groups["test"])
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))
    # a patient keeps its demographics
    demo: dict = {}
    for rows in splits.values():
        for r in rows:
            demo.setdefault(r["group_id"], set()).add(json.dumps(r["attributes"], sort_keys=True))
    assert all(len(v) == 1 for v in demo.values())
    for r in splits["test"]:
        assert (d / "images" / r["image"]).is_file()
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert r["conversations"][1]["value"] == sc.DERM_ANSWERS[r["label"]]
    card = json.loads((d / "datacard.json").read_text())
    assert card["counts"]["test"]["race_x_label"]["dark"]["MEL"] == 6
    assert card["shortcut"]["train_minority_label_probs"]["MEL"] == pytest.approx(0.85)


def test_records_pass_schema(derm_runs):
    schema = pytest.importorskip("fairllava.data.schema")
    for r in read_jsonl(derm_runs[0.5] / "train.jsonl"):
        assert schema.record_problems(r, require_group_id=True) == []
    vocabs = sc.shortcut_vocabs()
    assert vocabs["race"].encode("dark") == 1 and vocabs["sex"].encode("F") == 1


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_byte_for_byte(tmp_path):
    kw = {**SMALL, "n_train": 36, "evidence_probe": True, "n_probe_per_cell": 10}
    sc.prepare_shortcut("derm-vqa", tmp_path / "a", seed=7, strength=1.0, **kw)
    sc.prepare_shortcut("derm-vqa", tmp_path / "b", seed=7, strength=1.0, **kw)
    sc.prepare_shortcut("derm-vqa", tmp_path / "c", seed=8, strength=1.0, **kw)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 36 + 12 + 36 + 4
    assert a != c


def test_equal_evidence_by_construction():
    """The same scene on a dark background is a per-channel rescaling: background-relative features match."""
    diffs, between = [], []
    for i in range(6):
        lab = sc.DERM_LABELS[i % 3]
        light, _ = derm.render_derm(rendering._rng(0, "t", i), lab, "light", "M", "45-65", 64)
        dark, _ = derm.render_derm(rendering._rng(0, "t", i), lab, "dark", "M", "45-65", 64)
        other, _ = derm.render_derm(rendering._rng(0, "t", i + 100), lab, "light", "M", "45-65", 64)
        fl, fd, fo = (evidence.image_features(x) for x in (light, dark, other))
        diffs.append(np.abs(fl - fd).mean())
        between.append(np.abs(fl - fo).mean())
        assert light.mean() > dark.mean() + 60  # the tone itself is plainly visible
    assert max(diffs) < 0.2 * min(between)  # only 8-bit rounding differs


def test_evidence_probe_equal_across_groups():
    cfg = rendering.ShortcutConfig(task="derm-vqa", seed=0, n_probe_per_cell=40, image_size=64)
    probe = evidence._evidence_probe(cfg, derm._derm_plan(cfg), "pixels")
    accs = {g: v["balanced_accuracy"] for g, v in probe["per_group"].items()}
    assert set(accs) == {"light", "dark"}
    assert all(a > 0.5 for a in accs.values())  # the class is visible (chance 0.33)
    assert all(a < 0.97 for a in accs.values())  # ... but ambiguous
    assert probe["max_abs_difference"] <= 0.06


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="strength"):
        sc.prepare_shortcut("derm-vqa", tmp_path / "x", strength=1.5, **SMALL)
    with pytest.raises(ValueError, match="task"):
        sc.prepare_shortcut("nope", tmp_path / "x", **SMALL)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FairllavaError, match="already exists"):
        sc.prepare_shortcut("derm-vqa", tmp_path / "exists", **SMALL)


# --------------------------------------------------------------------------- cxr-report (synthetic XML)

_XML = """<?xml version="1.0"?><eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="INDICATION">{ind}</AbstractText><AbstractText Label="FINDINGS">{fnd}</AbstractText>
<AbstractText Label="IMPRESSION">synthetic impression</AbstractText></Abstract></Article></MedlineCitation>
<MeSH>{mesh}</MeSH><parentImage id="CXR{n}_IM-0001-1001"><url>x</url></parentImage></eCitation>"""


def _fake_iu_dir(d: Path, n: int = 80) -> Path:
    """NLMCXR_reports.tgz + nlmcxr_dicom_metadata.csv.gz with synthetic text (never real report text)."""
    d.mkdir(parents=True, exist_ok=True)
    path = d / "NLMCXR_reports.tgz"
    tags = [["normal"], ["Cardiomegaly/mild"], ["Opacity/lung/base/left"], ["Pleural Effusion/right"],
            ["Spine/degenerative"]]
    with tarfile.open(path, "w:gz") as tf:
        for i in range(1, n + 1):
            mesh = "".join(f"<major>{t}</major>" for t in tags[i % len(tags)])
            ind = "synthetic female patient" if i % 3 == 0 else "synthetic indication"
            fnd = "" if i % 11 == 0 else f"synthetic findings number {i}"
            data = _XML.format(n=i, ind=ind, fnd=fnd, mesh=mesh).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{i}.xml")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rows = "imageid,Patient's Birth Date,Study Date,View Position\n" + "".join(
        f"CXR{i}_IM-0001-1001,19{40 + i % 50:02d}0101,20120601,PA\n" for i in range(1, n + 1))
    with gzip.open(d / "nlmcxr_dicom_metadata.csv.gz", "wt", encoding="utf-8") as f:
        f.write(rows)
    return d


def test_cxr_report_from_synthetic_xml(tmp_path):
    iu = _fake_iu_dir(tmp_path / "iu")
    reports = cxr.read_iu_reports(iu)
    assert len(reports) == 80 and reports[0].report_id == "CXR1"
    assert reports[2].sex == "F" and reports[0].sex is None
    assert reports[0].age == 2012 - 1941
    card = prepare.prepare_shortcut("cxr-report", tmp_path / "out", seed=0, strength=1.0, n_train=20,
                               n_val_per_cell=2, n_test_per_cell=3, image_size=48, evidence_probe=True,
                               n_probe_per_cell=10, iu_data_dir=iu,
                               progress=False)
    assert card["labels"] == ["normal", "abnormal"]
    test = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert set(_table(test).values()) == {3}
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    t = _table(train)
    assert t[("dark", "abnormal")] / (t[("dark", "abnormal")] + t[("dark", "normal")]) == pytest.approx(0.85, abs=0.1)
    by_id = {r.report_id: r for r in reports}
    for r in test + train:
        rep = by_id[r["group_id"]]
        assert r["conversations"][1]["value"] == rep.findings  # the real (here synthetic) findings text
        assert "Spine" not in " ".join(rep.mesh)  # undrawable reports are excluded
        assert r["meta"]["drawn"] == ([] if r["label"] == "normal" else r["meta"]["drawn"])
    with pytest.raises(FairllavaError, match="usable"):
        prepare.prepare_shortcut("cxr-report", tmp_path / "big", n_train=500, iu_data_dir=iu,
                            **{k: v for k, v in SMALL.items() if k != "n_train"})


def test_cxr_findings_mapping():
    assert cxr.cxr_findings(["normal"]) == []
    assert cxr.cxr_findings(["spine/degenerative"]) is None
    f = cxr.cxr_findings(["pleural effusion/right/large", "cardiomegaly/mild"])
    assert [x["kind"] for x in f] == ["effusion", "cardiomegaly"]
    assert f[0]["side"] == "right" and f[0]["severity"] > 1 and f[1]["severity"] < 1


def test_real_iu_reports_counts():
    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision wheel (IU X-ray reports) not installed")
    reports = cxr.read_iu_reports()
    assert len(reports) == 3955
    assert sum(1 for r in reports if r.findings) == 3425
    assert sum(1 for r in reports if r.age is not None) == 3850


def test_cli_prepare_shortcut(tmp_path):
    from typer.testing import CliRunner

    from fairllava.cli import app

    res = CliRunner().invoke(app, ["prepare", "shortcut", "--out", str(tmp_path / "o"), "--n-train", "24",
                                   "--n-test-per-cell", "2", "--n-val-per-cell", "1", "--image-size", "40",
                                   "--no-evidence-probe", "--shortcut-strength", "0"])
    assert res.exit_code == 0, res.output
    assert len(read_jsonl(tmp_path / "o" / "test.jsonl")) == 12
