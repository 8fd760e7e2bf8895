"""Leakage audit: patient-level folds, reproducibility, detection of an injected attribute, streaming cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fairllava.audit import (AuditConfig, FeatureConfig, FeatureSet, ProbeConfig, audit_features, extract_features,
                             grouped_folds, run_audit)
from fairllava.audit.probes import _auc_w, _balanced_accuracy_w, ba_lower_bound, club_estimate, information_bound
from fairllava.errors import FairllavaError


def test_folds_never_split_a_group_and_are_seeded():
    rng = np.random.default_rng(0)
    groups = [f"P{int(g)}" for g in rng.integers(0, 70, size=300)]
    f0 = grouped_folds(groups, 5, seed=0)
    for g in set(groups):
        assert len({int(f0[i]) for i, x in enumerate(groups) if x == g}) == 1
    sizes = np.bincount(f0)
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 10
    assert np.array_equal(f0, grouped_folds(groups, 5, seed=0))
    assert not np.array_equal(f0, grouped_folds(groups, 5, seed=1))
    with pytest.raises(ValueError, match="groups"):
        grouped_folds(["a", "b"], 3)


def test_weighted_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 80)
    s = np.round(rng.normal(size=80) + (y == 1), 1)  # rounded: ties exercise the 1/2 credit
    pred = rng.integers(0, 3, 80)
    W = rng.integers(0, 3, size=(4, 80)).astype(float)
    for w in W:
        assert _auc_w(y == 1, s, w[None])[0] == pytest.approx(roc_auc_score(y == 1, s, sample_weight=w))
        assert _balanced_accuracy_w(y, pred, w[None], 3)[0] == pytest.approx(
            balanced_accuracy_score(y, pred, sample_weight=w))


def test_mi_estimates():
    y = np.array([0, 1] * 20)
    flat = np.log(np.full((40, 2), 0.5))
    assert club_estimate(flat, y) == pytest.approx(0.0, abs=1e-9)
    assert ba_lower_bound(flat, y) == pytest.approx(0.0, abs=1e-9)
    sure = np.log(np.where(np.eye(2)[y] > 0, 1 - 1e-6, 1e-6))
    assert ba_lower_bound(sure, y) == pytest.approx(np.log(2), abs=1e-4)
    assert club_estimate(sure, y) > np.log(2)  # CLUB is an upper-bound estimate


def test_information_bound_never_exceeds_entropy():
    """On any input (over-confident misses, one class, skewed classes, weights) the figure is in [0, H(a)]."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        k = int(rng.integers(2, 6))
        n = int(rng.integers(2, 60))
        y = rng.integers(0, k if trial % 7 else 1, size=n)  # every 7th: a single class (H = 0)
        logits = rng.normal(0, float(rng.choice([0.1, 3, 30])), size=(n, k))
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        W = rng.poisson(1.0, size=(5, n)).astype(float) + np.eye(1, n)  # bootstrap-like weights, never all zero
        for bound, H in (information_bound(logp, y), information_bound(logp, y, W)):
            assert np.all(bound >= 0) and np.all(bound <= H + 1e-12) and np.all(H <= np.log(k) + 1e-12)
    y = np.array([0, 1] * 20)
    sure = np.log(np.where(np.eye(2)[y] > 0, 1 - 1e-6, 1e-6))
    wrong = np.log(np.where(np.eye(2)[y] > 0, 1e-6, 1 - 1e-6))  # confidently wrong: the raw bound is -13 nats
    assert information_bound(sure, y)[0][0] == pytest.approx(np.log(2), abs=1e-4)
    assert club_estimate(sure, y) > np.log(2)  # CLUB exceeds H(a) = ln 2; the bound cannot
    assert information_bound(wrong, y)[0][0] == 0.0 and ba_lower_bound(wrong, y) < -10


def _synthetic(n_groups=60, per=3, d=16, inject_layer=1, strength=2.5, seed=0):
    """Records + features where ``race`` is linearly encoded only at ``inject_layer`` (Bayes accuracy ~0.97)."""
    rng = np.random.default_rng(seed)
    records, race = [], []
    for g in range(n_groups):
        r = ["light", "dark"][g % 2]
        sex = ["M", "F"][int(rng.integers(2))]
        for k in range(per):
            records.append({"id": f"s{g}-{k}", "group_id": f"P{g}", "conversations": [],
                            "attributes": {"race": r, "sex": sex, "age_group": None}})
            race.append(r == "dark")
    race = np.array(race, dtype=float)
    X = {l: rng.normal(size=(len(records), d)).astype(np.float32) for l in (0, 1, 2)}
    X[inject_layer][:, :3] += strength * race[:, None]
    return records, FeatureSet([r["id"] for r in records], [0, 1, 2], X)


def test_injected_attribute_detected_and_chance_without():
    records, fs = _synthetic()
    cfg = AuditConfig(attributes=["race", "sex", "age_group"], probe=ProbeConfig(folds=5, n_boot=200))
    res = audit_features({"m": fs}, records, cfg)
    rows = {r["layer"]: r for r in res["models"]["m"]["attributes"]["race"]["per_layer"]}
    assert rows[1]["balanced_accuracy"] > 0.9 and rows[1]["ci"]["balanced_accuracy"][0] > 0.8
    assert rows[1]["mi"] > 0.3 and rows[1]["mi_lower"] > 0.2
    H = res["attributes"]["race"]["entropy"]
    assert H == pytest.approx(np.log(2)) and 0.2 < rows[1]["info_lower_bound"] <= H
    assert all(0 <= r["info_lower_bound"] <= r["entropy"] for r in rows.values())
    assert rows[1]["ci"]["info_lower_bound"][1] <= H
    for layer in (0, 2):
        assert abs(rows[layer]["balanced_accuracy"] - 0.5) < 0.12
        lo, hi = rows[layer]["ci"]["balanced_accuracy"]
        assert lo < 0.5 + 0.05 and hi > 0.5 - 0.05
        assert abs(rows[layer]["auc"] - 0.5) < 0.15
    assert res["models"]["m"]["attributes"]["race"]["argmax_layer"] == 1
    assert [s["attribute"] for s in res["skipped"]] == ["age_group"]  # all missing: never a class


def test_audit_reproducible_and_models_share_folds():
    records, fs = _synthetic()
    cfg = AuditConfig(attributes=["race"], probe=ProbeConfig(folds=4, n_boot=100, seed=3))
    a = audit_features({"x": fs, "y": fs}, records, cfg)
    b = audit_features({"x": fs, "y": fs}, records, cfg)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    # identical features -> identical numbers, CIs included: same folds and same bootstrap resamples
    assert a["models"]["x"] == a["models"]["y"]
    c = audit_features({"x": fs}, records, AuditConfig(attributes=["race"], probe=ProbeConfig(folds=4, n_boot=100, seed=4)))
    assert c["models"]["x"] != a["models"]["x"]


# --------------------------------------------------------------------------- streaming on a tiny VLM


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from fairllava.data.preparers.shortcut import prepare_shortcut
    from fairllava.io import read_jsonl

    d = tmp_path_factory.mktemp("bench") / "derm"
    prepare_shortcut("derm-vqa", d, seed=0, strength=1.0, n_train=12, n_val_per_cell=1, n_test_per_cell=4,
                     image_size=32, evidence_probe=False, progress=False)
    return d, read_jsonl(d / "test.jsonl")


@pytest.fixture(scope="module")
def tiny():
    from fairllava.models.tiny import build_tiny_llava

    return build_tiny_llava(seed=0)


def test_streaming_cache_resume_after_kill(bench, tiny, tmp_path):
    d, records = bench
    model, proc = tiny
    cfg = FeatureConfig(layers=[0, 2, 4], tokens="image", pooling="masked_mean", batch_size=5)
    ref = extract_features(model, proc, records, d / "images", tmp_path / "ref", cfg, progress=False)
    assert ref.X[2].shape == (24, 64) and ref.ids == [r["id"] for r in records]

    calls = {"n": 0}
    orig = model.forward

    def dying_forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while the third batch is in flight
        return orig(*a, **k)

    model.forward = dying_forward
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_features(model, proc, records, d / "images", tmp_path / "c", cfg, progress=False)
    finally:
        del model.forward
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["meta.json", "shard_00000.npz", "shard_00001.npz"]  # no partial shard, no temp file

    calls["n"] = 0
    model.forward = lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), orig(*a, **k))[1]
    try:
        resumed = extract_features(model, proc, records, d / "images", tmp_path / "c", cfg, progress=False)
    finally:
        del model.forward
    assert calls["n"] == 3  # 5 batches in all, 2 reused from the cache
    for layer in (0, 2, 4):
        np.testing.assert_allclose(resumed.X[layer], ref.X[layer], rtol=1e-5, atol=1e-6)
    with pytest.raises(FairllavaError, match="another model/config/data"):
        extract_features(model, proc, records, d / "images", tmp_path / "c",
                         FeatureConfig(layers=[0, 2, 4], pooling="random_token", batch_size=5), progress=False)


def test_pooled_features_match_full_hidden_states(bench, tiny, tmp_path):
    """Pooling inside the hooks equals pooling HF output_hidden_states afterwards."""
    from fairllava.data.collator import VLMCollator
    from fairllava.data.dataset import VLMDataset

    d, records = bench
    model, proc = tiny
    recs = records[:4]
    fs = extract_features(model, proc, recs, d / "images", tmp_path / "f",
                          FeatureConfig(layers="all", tokens="all", batch_size=4), progress=False)
    ds = VLMDataset(recs, d / "images")
    batch = VLMCollator(proc, mode="generate")([ds[i] for i in range(4)])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], output_hidden_states=True)
    m = batch["attention_mask"].float()[:, :, None]
    assert fs.layers == list(range(len(out.hidden_states)))
    for i, h in enumerate(out.hidden_states):
        np.testing.assert_allclose(fs.X[i], ((h * m).sum(1) / m.sum(1)).numpy(), rtol=1e-4, atol=1e-5)


def test_run_audit_on_benchmark_with_peft_model(bench, tiny, tmp_path):
    from fairllava.models.loading import LoraSettings, apply_lora
    from fairllava.models.tiny import build_tiny_llava

    d, records = bench
    base, proc = tiny
    lora_model, _ = build_tiny_llava(seed=0)
    lora_model = apply_lora(lora_model, LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg = AuditConfig(attributes=["race", "sex"],
                      features=FeatureConfig(layers=[0, 2], batch_size=8),
                      probe=ProbeConfig(folds=3, n_boot=50))
    res = run_audit({"base": (base, proc), "lora": lambda: (lora_model, proc)}, records, d / "images",
                    tmp_path / "out", cfg, progress=False)
    for name in ("audit.json", "leakage.png", "leakage_auc.png", "audit.md"):
        assert (tmp_path / "out" / name).is_file()
    # the shortcut attribute (background tone) is visible: far above chance even for a random tiny model
    assert res["models"]["base"]["attributes"]["race"]["max_balanced_accuracy"] > 0.8
    # LoRA B is initialised at zero: the adapted model computes the same function -> same numbers
    assert res["models"]["lora"]["attributes"] == res["models"]["base"]["attributes"]
    with pytest.raises(FairllavaError, match="already exists"):
        run_audit({"base": (base, proc)}, records, d / "images", tmp_path / "out", cfg, progress=False)


def test_cli_audit(bench, tmp_path):
    from typer.testing import CliRunner

    from fairllava.cli import app
    from fairllava.models.tiny import save_tiny_llava

    d, _ = bench
    mdir = save_tiny_llava(tmp_path / "tiny", seed=0)
    res = CliRunner().invoke(app, ["audit", "--model", f"base={mdir}", "--data", str(d / "test.jsonl"),
                                   "--out", str(tmp_path / "a"), "--layers", "0,4", "--folds", "3",
                                   "--n-boot", "20", "--attributes", "race"])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert out["attributes"]["race"]["classes"] == ["light", "dark"]  # vocab from the datacard
    assert [r["layer"] for r in out["models"]["base"]["attributes"]["race"]["per_layer"]] == [0, 4]
    bad = CliRunner().invoke(app, ["audit", "--model", str(mdir), "--data", str(d / "test.jsonl"),
                                   "--out", str(tmp_path / "b"), "--layers", "0,x"])
    assert bad.exit_code != 0

    from fairllava.io import atomic_write_jsonl, read_jsonl

    rows = [{"id": r["id"], "prediction": "melanoma.", "reference": r["conversations"][1]["value"],
             "attributes": r["attributes"], "label": r["label"]} for r in read_jsonl(d / "test.jsonl")]
    atomic_write_jsonl(tmp_path / "preds.jsonl", rows)
    cf = CliRunner().invoke(app, ["counterfactual", "--model", str(mdir), "--predictions", str(tmp_path / "preds.jsonl"),
                                  "--data", str(d / "test.jsonl"), "--out", str(tmp_path / "cf"),
                                  "--attribute", "sex", "--n-boot", "20"])
    assert cf.exit_code == 0, cf.output
    out = json.loads((tmp_path / "cf" / "counterfactual.json").read_text())
    assert out["metrics"]["accuracy"]["mean_abs_diff"] == 0.0  # the same answer everywhere: no difference


def test_counterfactual_pairs_from_the_fixed_encoder(bench, tiny, tmp_path):
    from fairllava.audit import run_counterfactual

    d, records = bench
    model, proc = tiny
    answers = {"MEL": "melanoma.", "NV": "nevus.", "VASC": "vascular lesion."}
    preds = []
    for r in records:  # the light group is always right, the dark group always says melanoma
        pred = answers[r["label"]] if r["attributes"]["race"] == "light" else "melanoma."
        preds.append({"id": r["id"], "prediction": pred, "reference": answers[r["label"]],
                      "attributes": r["attributes"], "label": r["label"]})
    res = run_counterfactual(model, proc, records, d / "images", preds, tmp_path / "cf", attribute="race",
                             groups=("light", "dark"), task="vqa", metrics=["accuracy"], n_boot=100,
                             progress=False)
    assert res["n_pairs"] == 12  # 4 per label and group -> 4 pairs per label
    by_id = {r["id"]: r for r in records}
    used = [p["a"] for p in res["pairs"]] + [p["b"] for p in res["pairs"]]
    assert len(used) == len(set(used))
    for p in res["pairs"]:
        a, b = by_id[p["a"]], by_id[p["b"]]
        assert a["label"] == b["label"] and a["attributes"]["race"] == "light" and b["attributes"]["race"] == "dark"
    acc = res["metrics"]["accuracy"]
    # pairs of MEL agree, the other 8 of 12 differ by 100 points
    assert acc["mean_abs_diff"] == pytest.approx(100 * 8 / 12)
    assert (tmp_path / "cf" / "counterfactual.json").is_file()
    with pytest.raises(FairllavaError, match="does not occur"):
        run_counterfactual(model, proc, records, d / "images", preds, tmp_path / "cf2", attribute="race",
                           groups=("light", "purple"), task="vqa", progress=False)


def test_counterfactual_pairs_identical_for_two_models(bench, tmp_path):
    """Two models that share the base vision tower but differ elsewhere get the same pairs (their own index-0
    features would not give them), and several models are scored on one pair list."""
    import copy

    from fairllava.audit import run_counterfactual
    from fairllava.fairness import match_pairs
    from fairllava.models.tiny import build_tiny_llava

    d, records = bench
    m1, proc = build_tiny_llava(seed=0)
    m2 = copy.deepcopy(m1)
    with torch.no_grad():  # "another fine-tune": new projector and LM weights, the same frozen vision tower
        for n, p in m2.named_parameters():
            if "vision_tower" not in n:
                p.add_(0.5 * torch.randn_like(p))
    ans = {"MEL": "melanoma.", "NV": "nevus.", "VASC": "vascular lesion."}
    preds = {k: [{"id": r["id"], "prediction": ans[r["label"]] if k == "a" else "nevus.", "reference": ans[r["label"]],
                  "attributes": r["attributes"], "label": r["label"]} for r in records] for k in ("a", "b")}
    kw = dict(attribute="race", groups=("light", "dark"), task="vqa", metrics=["accuracy"], n_boot=20, progress=False)
    r1 = run_counterfactual(m1, proc, records, d / "images", preds, tmp_path / "c1", **kw)
    r2 = run_counterfactual(m2, proc, records, d / "images", preds, tmp_path / "c2", **kw)
    assert r1["pairs"] == r2["pairs"] and r1["n_pairs"] == 12
    assert set(r1["models"]) == {"a", "b"} and r1["models"]["a"]["accuracy"]["mean_abs_diff"] == 0.0
    assert r1["models"]["b"]["accuracy"]["n_pairs"] == 12
    own = []
    for m in (m1, m2):  # what the audited models' own image-token features would have matched
        fs = extract_features(m, proc, records, d / "images", tmp_path / f"f{len(own)}",
                              FeatureConfig(layers=[0], tokens="image", batch_size=8), progress=False)
        X = fs.X[0].astype(np.float64)
        own.append(match_pairs(X - X.mean(0), [r["attributes"]["race"] for r in records], [r["label"] for r in records],
                               groups=("light", "dark"), min_similarity=-1.0))
    assert [p[:2] for p in own[0]] != [p[:2] for p in own[1]]


def test_cache_refuses_other_weights(bench, tmp_path):
    from fairllava.models.loading import LoraSettings, apply_lora
    from fairllava.models.tiny import build_tiny_llava

    d, records = bench
    model, proc = build_tiny_llava(seed=0)
    model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg = FeatureConfig(layers=[0], batch_size=4)
    extract_features(model, proc, records[:4], d / "images", tmp_path / "f", cfg, progress=False)
    extract_features(model, proc, records[:4], d / "images", tmp_path / "f", cfg, progress=False)  # reuse: fine
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)  # "another adapter"
    with pytest.raises(FairllavaError, match="another model"):
        extract_features(model, proc, records[:4], d / "images", tmp_path / "f", cfg, progress=False)
