import csv
import json

import pandas as pd
import pytest

from fairllava.errors import FairllavaError
from fairllava.fairness import compare, evaluate_predictions, write_comparison_report, write_evaluation

from test_fairness import report_rows, vqa_rows

FILES = {"metrics.json", "scores_per_sample.jsonl", "metrics_by_group.csv", "fairness.csv", "meta.json", "report.md",
         "report.html"}


MARKER = "zqxj marker sentence that must never be written"


@pytest.fixture(scope="module")
def result():
    rows = report_rows(200)
    rows[5]["prediction"] += " " + MARKER
    rows[6]["reference"] += " " + MARKER
    return evaluate_predictions(rows, "report", metrics=["bleu4", "rouge_l", "keyword_f1"], n_boot=40, n_min=10)


def test_write_evaluation_files_parse_and_match(tmp_path, result):
    out = write_evaluation(result, tmp_path / "ev")
    assert {p.name for p in out.iterdir()} == FILES
    m = json.loads((out / "metrics.json").read_text())
    assert {"overall", "groups", "gap", "es", "ci"} <= set(m)
    assert set(m["ci"]) == {"overall", "groups", "gap", "es"}
    assert m["overall"]["bleu4"] == pytest.approx(result.overall["bleu4"])
    assert m["groups"]["race"]["White"]["n"] == result.groups["race"]["White"]["n"]
    assert m["es"]["race"]["rouge_l"] == pytest.approx(result.es["race"]["rouge_l"])

    by_group = pd.read_csv(out / "metrics_by_group.csv", keep_default_na=False, na_values=[""])
    assert list(by_group.columns) == ["attribute", "group", "n", "metric", "value", "ci_l", "ci_h"]
    row = by_group[(by_group.attribute == "age_group") & (by_group.group == "66+") & (by_group.metric == "rouge_l")].iloc[0]
    assert row.value == pytest.approx(result.groups["age_group"]["66+"]["rouge_l"])
    assert [row.ci_l, row.ci_h] == pytest.approx(result.ci["groups"]["age_group"]["66+"]["rouge_l"])

    fair = pd.read_csv(out / "fairness.csv", keep_default_na=False, na_values=[""])
    assert list(fair.columns) == ["attribute", "metric", "overall", "gap", "gap_ci_l", "gap_ci_h", "es", "es_ci_l",
                                  "es_ci_h", "es_variant", "n_groups", "excluded_groups"]
    race = fair[(fair.attribute == "race") & (fair.metric == "bleu4")].iloc[0]
    assert race.gap == pytest.approx(result.gap["race"]["bleu4"])
    assert "Tiny(n=8)" in race.excluded_groups

    rows = [json.loads(l) for l in (out / "scores_per_sample.jsonl").read_text().splitlines()]
    assert len(rows) == result.n and "prediction" not in rows[0] and "reference" not in rows[0]
    assert rows[0]["rouge_l"] == pytest.approx(result.per_sample[0]["rouge_l"])

    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_resamples"] == 40 and meta["scale"].startswith("percent") and len(meta["data_hash"]) == 64

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 * len(result.attributes)
    assert "src='http" not in html and "<script" not in html
    md = (out / "report.md").read_text()
    assert "| metric | gap [95% CI]" in md and "not, CheXbert" in md
    # no report text leaks into any output file
    for f in out.iterdir():
        assert "zqxj" not in f.read_text()


def test_refuses_overwrite_and_replaces_atomically(tmp_path, result):
    out = write_evaluation(result, tmp_path / "ev")
    with pytest.raises(FairllavaError, match="already exists"):
        write_evaluation(result, out)
    (out / "stale.txt").write_text("x")
    write_evaluation(result, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_comparison_report(tmp_path):
    a = vqa_rows(200, {"F": 0.9, "M": 0.6}, seed=1)
    b = vqa_rows(200, {"F": 0.8, "M": 0.75}, seed=1)
    res = compare(a, b, "vqa", names=("baseline", "fairllava"), n_boot=50, holm_correction=True)
    out = write_comparison_report(res.results, res.pvalues, tmp_path / "cmp", meta=res.meta)
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "pvalues.csv", "fairness.csv", "metrics.json", "meta.json", "baseline",
            "fairllava"} <= names
    assert {p.name for p in (out / "baseline").iterdir()} == FILES
    with open(out / "pvalues.csv") as f:
        pv = list(csv.DictReader(f))
    assert len(pv) == len(res.pvalues) and {"p_one_sided", "p_two_sided", "p_holm"} <= set(pv[0])
    assert float(pv[0]["p_one_sided"]) == pytest.approx(res.pvalues[0]["p_one_sided"])
    assert set(json.loads((out / "metrics.json").read_text())) == {"baseline", "fairllava"}
    assert "Paired bootstrap p-values" in (out / "report.md").read_text()


def test_reports_lead_with_the_verdict(tmp_path):
    from fairllava.fairness import compare_systems

    a = vqa_rows(200, {"F": 0.9, "M": 0.55}, seed=2)
    b = vqa_rows(200, {"F": 0.85, "M": 0.85}, seed=2)
    plain = evaluate_predictions(a, "vqa", metrics=["accuracy"], n_boot=50, n_perm=50, n_min=10)
    md = (write_evaluation(plain, tmp_path / "plain") / "report.md").read_text().splitlines()
    assert md[2].startswith("**Verdict:** no direction was given")
    assert "| p all groups equal | p Holm |" in "\n".join(md)
    ev = evaluate_predictions(a, "vqa", metrics=["accuracy", "macro_f1"], n_boot=100, n_perm=100, n_min=10,
                              directions=["sex=F>M"])
    md = (write_evaluation(ev, tmp_path / "ev") / "report.md").read_text().splitlines()
    c = ev.signed_gap["sex"]["accuracy"]
    assert md[2].startswith("**Primary endpoint:** signed gap of accuracy, sex: F > M")
    assert f"{c['value']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" in md[2] and "p = " in md[2]
    assert md[4].startswith("**Verdict:** M is worse off on accuracy (significant")
    cmp = compare_systems(a, b, "vqa", directions=["sex=F>M"], metrics=["accuracy", "macro_f1"], n_boot=100,
                          n_perm=100, n_min=10)
    out = write_comparison_report(cmp.results, cmp.pvalues, tmp_path / "cmp", meta=cmp.meta,
                                  endpoints=cmp.endpoints, mcnemar=cmp.mcnemar)
    md = (out / "report.md").read_text().splitlines()
    assert md[2].startswith("**Primary endpoint sex:accuracy**") and "Holm p = " in md[2]
    assert md[4].startswith("**Verdict:** method narrowed the gap on sex:accuracy")
    with open(out / "pvalues.csv") as f:
        pv = list(csv.DictReader(f))
    assert pv[0]["endpoint"] == "sex:accuracy" and pv[0]["family"] == "primary" and pv[0]["p_holm"]
    assert all(r["p_holm"] for r in pv)
    assert json.loads((out / "endpoints.json").read_text())["primary"] == ["sex:accuracy"]


def test_pooled_report(tmp_path):
    import numpy as np

    from fairllava.fairness import SeedPair, pool_paired
    from fairllava.report import write_pooled_report

    rng = np.random.default_rng(0)
    values = ["a"] * 100 + ["d"] * 100
    pairs = [SeedPair((rng.random(200) < np.repeat([0.85, 0.6], 100)) * 100.0,
                      (rng.random(200) < 0.75) * 100.0, values, ids=[str(i) for i in range(200)]) for _ in range(3)]
    res = pool_paired(pairs, "x=a>d", n_boot=100, n_perm=50)
    res["metric"] = "accuracy"
    out = write_pooled_report([res], tmp_path / "pool", ("lora", "fair"), {"primary": ["x:accuracy"]})
    md = (out / "report.md").read_text().splitlines()
    assert md[2].startswith("**Primary endpoint x:accuracy**") and "pooled over 3 seeds" in md[2]
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "pooled.json", "per_seed.csv",
                                               "pvalues.csv", "meta.json"}
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    json.loads((out / "pooled.json").read_text(), parse_constant=no_constants)  # strict JSON (no Infinity/NaN)
    with pytest.raises(FairllavaError, match="already exists"):
        write_pooled_report([res], out)
