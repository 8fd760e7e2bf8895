import json
import sys


from fairllava.cli import main

from test_fairness import report_rows, vqa_rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["fairllava", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_evaluate_and_compare_happy_path(tmp_path, monkeypatch, capsys):
    p = _write(tmp_path / "p.jsonl", report_rows(80))
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(p), "--out", str(tmp_path / "ev"),
                     "--metrics", "bleu4,rouge_l", "--n-boot", "20", "--n-min", "5", "--attributes", "race,sex")
    assert code == 0, out
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["groups"].keys() == {"race", "sex"}
    a = _write(tmp_path / "a.jsonl", vqa_rows(60, {"F": 0.9, "M": 0.5}))
    b = _write(tmp_path / "b.jsonl", vqa_rows(60, {"F": 0.7, "M": 0.7}))
    code, out = _run(monkeypatch, capsys, "compare", str(a), str(b), "--task", "vqa", "--out", str(tmp_path / "cmp"),
                     "--n-boot", "20", "--labels", "MEL,NV")
    assert code == 0, out
    assert (tmp_path / "cmp" / "pvalues.csv").exists()


def _assert_one_line_error(code, out, pattern):
    assert code == 2
    assert "Traceback" not in out
    lines = [l for l in out.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], out


def test_bad_inputs_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    good = report_rows(30)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(good[0]) + "\n{not json\n")
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(bad_json), "--out", str(tmp_path / "o1"))
    _assert_one_line_error(code, out, "bad.jsonl:2")

    missing = _write(tmp_path / "missing.jsonl", [{k: v for k, v in good[0].items() if k != "prediction"}])
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(missing), "--out", str(tmp_path / "o2"))
    _assert_one_line_error(code, out, "missing field(s) prediction")

    p = _write(tmp_path / "p.jsonl", good)
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(p), "--out", str(tmp_path / "o3"),
                     "--attributes", "ethnicity", "--metrics", "bleu4")
    _assert_one_line_error(code, out, "attribute 'ethnicity' is absent")

    other = _write(tmp_path / "q.jsonl", [dict(r, id="z" + r["id"]) for r in good])
    code, out = _run(monkeypatch, capsys, "compare", str(p), str(other), "--out", str(tmp_path / "o4"),
                     "--metrics", "bleu4", "--n-boot", "5")
    _assert_one_line_error(code, out, "share no sample ids")

    (tmp_path / "exists").mkdir()
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(p), "--out", str(tmp_path / "exists"))
    _assert_one_line_error(code, out, "already exists")
    for d in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / d).exists()


def test_type_errors_name_the_real_line(tmp_path, monkeypatch, capsys):
    rows = report_rows(3)
    rows[2]["prediction"] = None
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(p), "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, out, "p.jsonl:4 (id=r2): 'prediction' must be a string")


def _paired_vqa(n, acc_a, acc_b, seed, attr="race"):
    """Baseline and method answers on the same samples (same ids, labels and references)."""
    a = vqa_rows(n, acc_a, seed=seed, attr=attr)
    b = vqa_rows(n, acc_b, seed=seed, attr=attr)
    for i, (ra, rb) in enumerate(zip(a, b)):
        ra["group_id"] = rb["group_id"] = f"p{i // 2}"
    return a, b


def test_evaluate_with_direction_leads_with_the_signed_gap(tmp_path, monkeypatch, capsys):
    a, _ = _paired_vqa(200, {"light": 0.85, "dark": 0.6}, {"light": 0.8, "dark": 0.8}, seed=3)
    p = _write(tmp_path / "a.jsonl", a)
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(p), "--task", "vqa", "--out",
                     str(tmp_path / "ev"), "--labels", "MEL,NV", "--n-boot", "200", "--n-perm", "200",
                     "--direction", "race=light>dark", "--rate", "MEL", "--metrics", "accuracy")
    assert code == 0, out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    cell = m["signed_gap"]["race"]["accuracy"]
    assert {"advantaged", "disadvantaged", "value", "ci", "p_value"} <= set(cell)
    assert cell["advantaged"] == "light" and cell["value"] > 10 and cell["ci"][0] > 0 and cell["p_value"] < 0.05
    assert "fpr_MEL" in m["signed_gap"]["race"] and "race" in m["p_all_groups_equal"]
    meta = json.loads((tmp_path / "ev" / "meta.json").read_text())
    assert meta["resampling"].startswith("cluster") and "100 clusters" in meta["resampling"]
    head = (tmp_path / "ev" / "report.md").read_text().splitlines()[:4]
    assert any(l.startswith("**Primary endpoint:** signed gap of accuracy, race: light > dark") for l in head), head
    assert "<strong>Verdict:</strong>" in (tmp_path / "ev" / "report.html").read_text()[:3000]


def test_compare_with_direction_rate_and_primary(tmp_path, monkeypatch, capsys):
    a, b = _paired_vqa(240, {"light": 0.85, "dark": 0.55}, {"light": 0.8, "dark": 0.8}, seed=4)
    pa, pb = _write(tmp_path / "a.jsonl", a), _write(tmp_path / "b.jsonl", b)
    code, out = _run(monkeypatch, capsys, "compare", "--pair", str(pa), str(pb), "--task", "vqa", "--out",
                     str(tmp_path / "cmp"), "--labels", "MEL,NV", "--n-boot", "200", "--n-perm", "200",
                     "--direction", "race=light>dark", "--rate", "MEL", "--primary", "race:accuracy",
                     "--primary", "race:fpr_MEL", "--metrics", "accuracy", "--names", "lora,fair")
    assert code == 0, out
    assert "primary race:accuracy" in out
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Primary endpoint race:accuracy**"), md[:400]
    assert "Exact McNemar tests per group" in md and "p Holm" in md
    ep = json.loads((tmp_path / "cmp" / "endpoints.json").read_text())
    assert ep["primary"] == ["race:accuracy", "race:fpr_MEL"]
    fam = {e["endpoint"]: e["family"] for e in ep["endpoints"]}
    assert fam == {"race:accuracy": "primary", "race:fpr_MEL": "primary"}
    first = ep["endpoints"][0]
    assert first["diff"] > 0 and first["p_value"] < 0.05 and first["p_holm"] >= first["p_value"]
    with open(tmp_path / "cmp" / "pvalues.csv") as f:
        header = f.readline().strip().split(",")
    assert {"endpoint", "family", "diff", "ci_l", "ci_h", "p_value", "p_holm"} <= set(header)


def test_compare_several_seeds_pools(tmp_path, monkeypatch, capsys):
    import numpy as np

    base, _ = _paired_vqa(160, {"light": 1.0, "dark": 1.0}, {"light": 1.0, "dark": 1.0}, seed=10)
    rng = np.random.default_rng(0)

    def answers(acc):  # one test set (same ids, labels, references), fresh answers per seed and system
        rows = []
        for r in base:
            ok = rng.random() < acc[r["attributes"]["race"]]
            pred = r["label"] if ok else ("NV" if r["label"] == "MEL" else "MEL")
            rows.append(dict(r, prediction=f"It is {pred}"))
        return rows

    args = []
    for s in range(3):
        a, b = answers({"light": 0.85, "dark": 0.65}), answers({"light": 0.8, "dark": 0.78})
        args += ["--pair", str(_write(tmp_path / f"a{s}.jsonl", a)), str(_write(tmp_path / f"b{s}.jsonl", b))]
    code, out = _run(monkeypatch, capsys, "compare", *args, "--task", "vqa", "--out", str(tmp_path / "pool"),
                     "--labels", "MEL,NV", "--n-boot", "100", "--n-perm", "50", "--direction", "race=light>dark")
    assert code == 0, out
    pooled = json.loads((tmp_path / "pool" / "pooled.json").read_text())["endpoints"][0]
    assert len(pooled["per_seed"]) == 3 and pooled["metric"] == "accuracy"
    assert pooled["pooled"]["n_seeds"] == 3 and pooled["pooled"]["diff"] > 0
    assert (tmp_path / "pool" / "report.md").read_text().splitlines()[2].startswith("**Primary endpoint race:accuracy**")


def test_bad_inference_inputs_one_line_no_output(tmp_path, monkeypatch, capsys):
    a, b = _paired_vqa(60, {"light": 0.8, "dark": 0.6}, {"light": 0.8, "dark": 0.8}, seed=5)
    pa, pb = _write(tmp_path / "a.jsonl", a), _write(tmp_path / "b.jsonl", b)
    common = ["--task", "vqa", "--labels", "MEL,NV", "--n-boot", "20", "--n-perm", "20"]
    out_dir = tmp_path / "out"
    code, out = _run(monkeypatch, capsys, "evaluate", "--predictions", str(pa), "--out", str(out_dir), *common,
                     "--direction", "race=light>purple")
    _assert_one_line_error(code, out, "race='purple'")
    assert str(pa) in out and not out_dir.exists()
    short = _write(tmp_path / "short.jsonl", b[:50])
    code, out = _run(monkeypatch, capsys, "compare", "--pair", str(pa), str(short), "--out", str(out_dir), *common,
                     "--direction", "race=light>dark")
    _assert_one_line_error(code, out, "mismatched ids")
    assert str(short) in out and not out_dir.exists()
    reports = _write(tmp_path / "r.jsonl", [dict(r, attributes={"race": r["attributes"]["race"]}) for r in
                                            report_rows(60)])
    for r in (rr := [json.loads(l) for l in reports.read_text().splitlines()]):
        r.pop("label", None)
    code, out = _run(monkeypatch, capsys, "compare", "--pair", str(pa), str(pb), "--pair", str(reports), str(reports),
                     "--out", str(out_dir), "--task", "report", "--n-boot", "20", "--n-perm", "20",
                     "--direction", "race=light>dark")
    assert code == 2 and "Traceback" not in out and not out_dir.exists(), out
    assert str(reports) in out or str(pa) in out
    code, out = _run(monkeypatch, capsys, "compare", str(pa), str(pb), "--out", str(out_dir), *common,
                     "--direction-from", str(pa))
    _assert_one_line_error(code, out, "is an evaluated file")
