"""The demo end to end on the smoke preset (tiny random VLM): numbers come from the run, and runs repeat exactly."""
import json
import os

import pytest

from fairllava.demo import get_preset, run_demo, shortcut_signature, summary_markdown, update_readme
from fairllava.errors import FairllavaError
from fairllava.fairness import evaluate_predictions


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    a = run_demo(root / "a", "smoke", seed=0, log=lambda m: None, progress=False)
    b = run_demo(root / "b", "smoke", seed=0, log=lambda m: None, progress=False)
    return a, b


def test_report_numbers_are_recomputed_from_the_predictions(smoke_runs):
    res, _ = smoke_runs
    out = res.out_dir
    labels = json.loads((out / "data" / "datacard.json").read_text())["labels"]
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for row in res.summary:
        preds = out / "predictions" / f"{row['method']}.jsonl"
        r = evaluate_predictions(preds, task="vqa", labels=labels, n_boot=res.preset.n_boot, n_min=res.preset.n_min,
                                 seed=0, run="demo")
        assert row["overall"] == pytest.approx(r.overall["accuracy"], abs=1e-9)
        assert row["gap"] == pytest.approx(r.gap["race"]["accuracy"], abs=1e-9)
        # every metric of the report equals the recomputation
        assert metrics[row["method"]]["overall"] == pytest.approx(r.overall, abs=1e-9)
        # ...and the comparison is sensitive: a predictions file with one answer corrected scores differently
        rows = [json.loads(x) for x in preds.read_text().splitlines()]
        wrong = next(i for i, x in enumerate(rows) if x["prediction"].strip() != x["reference"].strip())
        rows[wrong]["prediction"] = rows[wrong]["reference"]
        tampered = evaluate_predictions(rows, task="vqa", labels=labels, n_boot=0, n_min=res.preset.n_min)
        assert tampered.overall["accuracy"] != pytest.approx(metrics[row["method"]]["overall"]["accuracy"], abs=1e-9)
        for attr in r.gap:
            assert {k: v for k, v in metrics[row["method"]]["gap"][attr].items() if v is not None} == pytest.approx(
                {k: v for k, v in r.gap[attr].items() if v is not None}, abs=1e-9)
        for g, vals in r.groups["race"].items():
            assert row[f"group:{g}"] == pytest.approx(vals["accuracy"], abs=1e-9)
        # accuracy recomputed by hand from the raw predictions file (label parsing aside)
        rows = [json.loads(x) for x in preds.read_text().splitlines()]
        assert len(rows) == json.loads((out / "data" / "datacard.json").read_text())["counts"]["test"]["n"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"] == json.loads(json.dumps(res.summary))
    assert (out / "report" / "report.html").is_file() and (out / "report" / "report.md").is_file()
    assert "| lora |" in (out / "summary.md").read_text()
    # the leakage audit ran on both trained models and is part of the report
    audit = json.loads((out / "report" / "audit.json").read_text())
    assert set(audit["models"]) == {"lora", "fairllava"}
    assert "Leakage audit" in (out / "report" / "report.md").read_text()
    # the shortcut signature is recomputed from the predictions too
    card = json.loads((out / "data" / "datacard.json").read_text())
    for m in ("lora", "fairllava"):
        assert summary["shortcut_signature"][m] == shortcut_signature(out / "predictions" / f"{m}.jsonl", card)
    assert "shortcut signature of `lora`" in (out / "summary.md").read_text()


def test_shortcut_signature_counts_false_positives_of_the_enriched_label(tmp_path):
    card = {"labels": ["MEL", "NV", "VASC"],
            "shortcut": {"attribute": "race", "train_minority_label_probs": {"MEL": 0.85, "NV": 0.075, "VASC": 0.075}}}
    rows = [("dark", "NV", "melanoma."), ("dark", "VASC", "melanoma."), ("dark", "NV", "nevus."),
            ("dark", "MEL", "melanoma."), ("light", "NV", "nevus."), ("light", "VASC", "melanoma."),
            ("light", "MEL", "nevus."), ("light", "NV", "vascular lesion.")]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "prediction": p, "reference": "", "label": y,
                                        "attributes": {"race": g}}) + "\n" for i, (g, y, p) in enumerate(rows)))
    sig = shortcut_signature(path, card)
    assert sig["label"] == "MEL" and sig["attribute"] == "race"
    assert sig["groups"]["dark"] == {"n": 3, "false_positive_pct": pytest.approx(200 / 3)}
    assert sig["groups"]["light"] == {"n": 3, "false_positive_pct": pytest.approx(100 / 3)}


def test_same_seed_same_results(smoke_runs):
    a, b = smoke_runs
    for method in ("lora", "fairllava"):
        pa = (a.out_dir / "predictions" / f"{method}.jsonl").read_text()
        pb = (b.out_dir / "predictions" / f"{method}.jsonl").read_text()
        assert pa == pb
        la = [json.loads(x) for x in (a.out_dir / method / "metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(x) for x in (b.out_dir / method / "metrics.jsonl").read_text().splitlines()]
        strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "sec" not in k} for r in rows]
        assert strip(la) == strip(lb)
    assert a.summary == b.summary


def test_resume_skips_finished_steps_and_refuses_other_settings(smoke_runs):
    res, _ = smoke_runs
    before = (res.out_dir / "predictions" / "lora.jsonl").stat().st_mtime_ns
    again = run_demo(res.out_dir, "smoke", seed=0, log=lambda m: None, progress=False)
    assert (res.out_dir / "predictions" / "lora.jsonl").stat().st_mtime_ns == before
    assert again.summary == res.summary
    with pytest.raises(FairllavaError, match="another seed"):
        run_demo(res.out_dir, "smoke", seed=1, log=lambda m: None, progress=False)


def test_bad_preset_and_unwritable_folder(tmp_path):
    with pytest.raises(FairllavaError, match="does not exist; choose one of: default, smoke"):
        get_preset("nope")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("cannot make a read-only folder as this user")
        with pytest.raises(FairllavaError, match="not writable"):
            run_demo(ro / "out", "smoke", log=lambda m: None, progress=False)
    finally:
        os.chmod(ro, 0o700)


def test_readme_update_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-results:begin -->\nold\n<!-- demo-results:end -->\noutro\n")
    update_readme(readme, "| new |\n")
    assert readme.read_text() == "intro\n<!-- demo-results:begin -->\n| new |\n<!-- demo-results:end -->\noutro\n"
    bad = tmp_path / "B.md"
    bad.write_text("no markers")
    with pytest.raises(FairllavaError, match="markers"):
        update_readme(bad, "x")


def test_summary_markdown_shape():
    rows = [{"method": "lora", "metric": "accuracy", "attribute": "race", "overall": 50.0, "overall_ci": [40, 60],
             "group:dark": 30.0, "group:dark_ci": None, "group:light": 70.0, "group:light_ci": [60, 80],
             "gap": 40.0, "gap_ci": [20, 60], "es": 1.22, "es_ci": [0.8, 2.4]}]
    md = summary_markdown(rows, [{"quantity": "gap", "p_one_sided": 0.01}], {"n_resamples": 1000})
    assert "| lora | 50.0 [40.0, 60.0] | 30.0 | 70.0 [60.0, 80.0] | 40.0 [20.0, 60.0] | 1.2 [0.8, 2.4] |" in md
    assert "p = 0.01" in md


def test_verdict_is_computed_from_the_numbers():
    from fairllava.demo import verdict

    base = {"method": "lora", "overall": 70.0, "gap": 20.0}
    better = {"method": "fairllava", "overall": 69.5, "gap": 5.0}
    assert verdict([base, better], [{"quantity": "gap", "p_one_sided": 0.01}]).startswith("FairLLaVA reduced the gap")
    assert "did not beat" in verdict([base, better], [{"quantity": "gap", "p_one_sided": 0.3}])
    assert "-0.5 points" in verdict([base, better], [{"quantity": "gap", "p_one_sided": 0.3}])
