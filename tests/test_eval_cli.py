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
