"""The demo (a one-seed preset of the benchmark) on the smoke preset: numbers come from the run, runs repeat exactly."""
import json
import os

import pytest

from fairllava.demo import demo_plan, get_preset, run_demo, shortcut_signature, update_readme
from fairllava.errors import FairllavaError
from fairllava.fairness import evaluate_predictions


def _run_dir(out, method):
    return out / "runs" / "derm-vqa" / "S1" / "seed0" / method / "test"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    a = run_demo(root / "a", "smoke", seed=0, log=lambda m: None, progress=False)
    b = run_demo(root / "b", "smoke", seed=0, log=lambda m: None, progress=False)
    return a, b


def test_demo_is_a_benchmark_plan():
    plan = demo_plan(get_preset("smoke"), seed=3)
    assert list(plan.method_variants()) == ["lora", "fairllava"] and plan.seeds("derm-vqa", "test") == [3]
    assert plan.methods["fairllava"].settings["fairness"]["mi_layer_index"] == 0


def test_report_numbers_are_recomputed_from_the_predictions(smoke_runs):
    res, _ = smoke_runs
    out = res.out_dir
    card = json.loads((out / "data" / "derm-vqa" / "seed0" / "S1" / "shortcut" / "datacard.json").read_text())
    labels = card["labels"]
    assert [r["method"] for r in res.rows] == ["lora", "fairllava"]
    for row in res.rows:
        preds = _run_dir(out, row["method"]) / "generate" / "predictions.jsonl"
        r = evaluate_predictions(preds, task="vqa", labels=labels, metrics=["accuracy"], n_boot=0, n_min=1)
        m = row["metrics"]["accuracy"]
        assert m["overall"]["value"] == pytest.approx(r.overall["accuracy"], abs=1e-9)
        g = r.groups["race"]
        assert m["groups"]["light"]["value"] == pytest.approx(g["light"]["accuracy"], abs=1e-9)
        assert m["groups"]["dark"]["value"] == pytest.approx(g["dark"]["accuracy"], abs=1e-9)
        assert m["signed_gap"]["value"] == pytest.approx(g["light"]["accuracy"] - g["dark"]["accuracy"], abs=1e-9)
        # ...and the recomputation is sensitive: a predictions file with one answer corrected scores differently
        rows = [json.loads(x) for x in preds.read_text().splitlines()]
        assert len(rows) == card["counts"]["test"]["n"]
        wrong = next(i for i, x in enumerate(rows) if x["prediction"].strip() != x["reference"].strip())
        rows[wrong]["prediction"] = rows[wrong]["reference"]
        tampered = evaluate_predictions(rows, task="vqa", labels=labels, metrics=["accuracy"], n_boot=0, n_min=1)
        assert tampered.overall["accuracy"] != pytest.approx(m["overall"]["value"], abs=1e-9)
        # the shortcut signature is recomputed from the predictions too
        sig = shortcut_signature(preds, card)["groups"]
        s = row["metrics"]["signature_fpr"]["groups"]
        assert [s["dark"]["value"], s["light"]["value"]] == pytest.approx(
            [sig["dark"]["false_positive_pct"], sig["light"]["false_positive_pct"]], abs=1e-9)
        # the leakage audit ran on every trained model
        assert row["leakage"]["index0"]["within_label"] is not None
    summary = (out / "summary.md").read_text()
    assert summary == res.summary_md and "| lora |" in summary and "| fairllava |" in summary
    assert res.rows[1]["verdict"]["text"] in summary  # the computed verdict, not a typed one
    for f in ("leaderboard.md", "leaderboard.html", "leaderboard.csv", "leaderboard.json"):
        assert (out / f).is_file()


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
        pa = (_run_dir(a.out_dir, method) / "generate" / "predictions.jsonl").read_text()
        pb = (_run_dir(b.out_dir, method) / "generate" / "predictions.jsonl").read_text()
        assert pa == pb
        la = [json.loads(x) for x in (_run_dir(a.out_dir, method) / "train" / "metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(x) for x in (_run_dir(b.out_dir, method) / "train" / "metrics.jsonl").read_text().splitlines()]
        strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "sec" not in k} for r in rows]
        assert strip(la) == strip(lb)
    assert a.rows == b.rows


def test_resume_skips_finished_steps_and_refuses_other_settings(smoke_runs):
    res, _ = smoke_runs
    preds = _run_dir(res.out_dir, "lora") / "generate" / "predictions.jsonl"
    before = preds.stat().st_mtime_ns
    again = run_demo(res.out_dir, "smoke", seed=0, log=lambda m: None, progress=False)
    assert preds.stat().st_mtime_ns == before
    assert again.rows == res.rows
    with pytest.raises(FairllavaError, match="another seed"):
        run_demo(res.out_dir, "smoke", seed=1, log=lambda m: None, progress=False)


def test_bad_preset_and_unwritable_folder(tmp_path):
    with pytest.raises(FairllavaError, match="does not exist; choose one of: default, full, smoke"):
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


@pytest.mark.parametrize("native_bf16", [True, False])
def test_demo_estimate_and_summary_name_the_precision_this_cpu_computes_in(monkeypatch, native_bf16):
    import fairllava.demo as demo
    import fairllava.models.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: native_bf16)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    p = get_preset("default")
    assert demo.compute_label() == ("cpu, bf16" if native_bf16 else "cpu, fp32 (no bf16 matmul)")
    assert demo.estimated_minutes(p) == pytest.approx(p.est_minutes * (1.0 if native_bf16 else demo.FP32_CPU_SLOWDOWN))
    monkeypatch.setattr("fairllava.benchmark.report.headline_markdown", lambda board: "")
    md = demo.summary_markdown({}, p, 0, {"seconds": 1.0, "machine": demo.machine_info()})
    assert md.rstrip().endswith(f"{demo.compute_label()}).")
