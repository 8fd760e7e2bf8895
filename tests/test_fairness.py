import random

import numpy as np
import pytest
import sacrebleu
from fairlearn.metrics import MetricFrame

from fairllava.errors import FairllavaError
from fairllava.fairness import (compare, counterfactual_gap, evaluate_predictions, frame_scores, group_index, holm,
                                match_pairs, paired_pvalue, resample_weights, rng_for, stratified_gap)
from fairllava.metrics.base import mean_metric

VOCAB = "the heart is normal size no effusion lungs clear pneumothorax . , left right mild edema".split()


def report_rows(n=240, seed=0, missing_every=17):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        race = rng.choice(["White"] * 4 + ["Black", "Asian", "Tiny"] if i % 40 else ["Tiny"])
        rows.append({"id": f"r{i}", "prediction": " ".join(rng.choices(VOCAB, k=rng.randint(0, 15))),
                     "reference": " ".join(rng.choices(VOCAB, k=rng.randint(2, 15))),
                     "attributes": {"sex": None if i % missing_every == 0 else rng.choice("FM"),
                                    "race": race, "age_group": rng.choice(["0-44", "45-65", "66+"])}})
    # make "Tiny" small so it is excluded by n_min
    tiny = [r for r in rows if r["attributes"]["race"] == "Tiny"]
    for r in tiny[8:]:
        r["attributes"]["race"] = "White"
    return rows


def vqa_rows(n, acc_by_group, seed=0, attr="sex"):
    rng = np.random.default_rng(seed)
    groups = list(acc_by_group)
    rows = []
    for i in range(n):
        g = groups[i % len(groups)]
        label = rng.choice(["MEL", "NV"])
        ok = rng.random() < acc_by_group[g]
        pred = label if ok else ("NV" if label == "MEL" else "MEL")
        rows.append({"id": f"v{i}", "prediction": f"It is {pred}", "reference": label, "label": label,
                     "attributes": {attr: g}})
    return rows


def test_group_metrics_equal_fairlearn_metricframe():
    rows = report_rows()
    res = evaluate_predictions(rows, "report", metrics=["bleu1", "bleu4", "rouge_l"], n_boot=0, n_min=5)
    P = np.array([r["prediction"] for r in rows], dtype=object)
    R = np.array([r["reference"] for r in rows], dtype=object)
    rouge = np.array([s["rouge_l"] for s in res.per_sample])

    def bleu4(y_true, y_pred):
        return sacrebleu.corpus_bleu(list(y_pred), [list(y_true)]).score

    def mean_score(y_true, y_pred):
        return float(np.mean(y_pred))

    for attr in ("race", "age_group"):
        sf = [r["attributes"][attr] for r in rows]
        mf = MetricFrame(metrics={"bleu4": bleu4}, y_true=R, y_pred=P, sensitive_features=sf)
        mf_r = MetricFrame(metrics={"rouge_l": mean_score}, y_true=R, y_pred=rouge, sensitive_features=sf)
        for g in mf.by_group.index:
            assert abs(res.groups[attr][g]["bleu4"] - mf.by_group.loc[g, "bleu4"]) < 1e-9
            assert abs(res.groups[attr][g]["rouge_l"] - mf_r.by_group.loc[g, "rouge_l"]) < 1e-9
        assert abs(res.overall["bleu4"] - mf.overall["bleu4"]) < 1e-9
        # all groups eligible at n_min=5 -> our gap is fairlearn's between-groups difference
        assert abs(res.gap[attr]["bleu4"] - mf.difference(method="between_groups")["bleu4"]) < 1e-9


def test_gap_es_hand_computed_and_small_groups_and_missing():
    # accuracy by group: A 30/40 = 75%, B 20/40 = 50%, C (n=5) excluded; 5 rows with missing sex
    rows = []
    def add(prefix, group, n, n_ok):
        for i in range(n):
            ok = i < n_ok
            rows.append({"id": f"{prefix}{i}", "prediction": "MEL" if ok else "NV", "reference": "MEL", "label": "MEL",
                         "attributes": {"sex": group}})
    add("a", "A", 40, 30)
    add("b", "B", 40, 20)
    add("c", "C", 5, 5)
    add("m", None, 5, 0)
    res = evaluate_predictions(rows, "vqa", metrics=["accuracy"], n_boot=0, n_min=20)
    overall = 100 * 55 / 90
    assert res.overall["accuracy"] == pytest.approx(overall)
    assert res.groups["sex"]["A"]["accuracy"] == pytest.approx(75.0)
    assert res.groups["sex"]["C"] == {"n": 5, "accuracy": 100.0}
    assert res.excluded["sex"] == {"C": 5} and res.n_missing["sex"] == 5
    assert res.gap["sex"]["accuracy"] == pytest.approx(25.0)
    assert res.es["sex"]["accuracy"] == pytest.approx(overall / 26.0)
    assert res.es_fairclip["sex"]["accuracy"] == pytest.approx(overall / (1 + abs(75 - overall) + abs(50 - overall)))
    assert res.worst["sex"]["accuracy"] == {"group": "B", "value": pytest.approx(50.0)}
    fc = evaluate_predictions(rows, "vqa", metrics=["accuracy"], n_boot=0, es_variant="fairclip")
    assert fc.to_dict()["es"]["sex"]["accuracy"] == pytest.approx(res.es_fairclip["sex"]["accuracy"])


def test_ci_coverage_near_nominal():
    """Percentile CIs of a mean cover the true value ~95% of the time (simulation, n=150, 300 datasets)."""
    rng = np.random.default_rng(123)
    true_p, n, hits, trials = 0.3, 150, 0, 300
    for t in range(trials):
        m = mean_metric("acc", 100.0 * (rng.random(n) < true_p))
        W = resample_weights(n, 400, rng_for(t, "sim", "overall", "acc"))
        boot = frame_scores(m, W, None)["all"]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        hits += lo <= 100 * true_p <= hi
    assert 0.89 <= hits / trials <= 0.99


def test_bootstrap_is_seeded_and_order_independent():
    rows = report_rows(160)
    kw = dict(metrics=["bleu4", "rouge_l"], n_boot=50, n_min=5)
    a = evaluate_predictions(rows, "report", attributes=["race", "sex"], **kw)
    b = evaluate_predictions(rows, "report", attributes=["sex", "race"], **kw)
    c = evaluate_predictions(rows, "report", attributes=["race", "sex"], seed=1, **kw)
    assert a.ci["gap"]["race"] == b.ci["gap"]["race"]
    assert a.ci["gap"]["race"] != c.ci["gap"]["race"]
    st = evaluate_predictions(rows, "report", attributes=["race"], bootstrap="stratified", **kw)
    lo, hi = st.ci["groups"]["race"]["White"]["rouge_l"]
    assert lo <= st.groups["race"]["White"]["rouge_l"] <= hi


def test_stratified_weights_keep_group_sizes():
    gi = group_index("g", ["a"] * 30 + ["b"] * 10 + [None] * 5, 1)
    W = resample_weights(45, 20, np.random.default_rng(0), gi.strata())
    assert np.all(W[:, :30].sum(1) == 30) and np.all(W[:, 30:40].sum(1) == 10) and np.all(W[:, 40:].sum(1) == 5)


def _resample_predictions(rows, acc_by_group, seed):
    """Same ids/labels as ``rows``; predictions correct with the given per-group accuracy."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        ok = rng.random() < acc_by_group[r["attributes"]["sex"]]
        out.append(dict(r, prediction=r["label"] if ok else ("NV" if r["label"] == "MEL" else "MEL")))
    return out


def test_paired_pvalues_small_for_real_difference():
    base = vqa_rows(400, {"F": 0.9, "M": 0.6}, seed=1)
    method = _resample_predictions(base, {"F": 0.78, "M": 0.75}, seed=2)
    res = compare(base, method, "vqa", metrics=["accuracy"], n_boot=300)
    gap_row = next(r for r in res.pvalues if r["quantity"] == "gap")
    assert gap_row["diff"] > 15
    assert gap_row["p_one_sided"] < 0.02
    # and the reverse direction is not significant
    rev = compare(method, base, "vqa", metrics=["accuracy"], n_boot=300)
    assert next(r for r in rev.pvalues if r["quantity"] == "gap")["p_one_sided"] > 0.5


def test_paired_pvalues_roughly_uniform_under_null():
    ps = []
    for s in range(40):
        a = vqa_rows(200, {"F": 0.7, "M": 0.7}, seed=1000 + s)
        b = _resample_predictions(a, {"F": 0.7, "M": 0.7}, seed=5000 + s)
        res = compare(a, b, "vqa", metrics=["accuracy"], n_boot=200, seed=s)
        ps.append(next(r["p_one_sided"] for r in res.pvalues if r["quantity"] == "gap"))
    ps = np.array(ps)
    assert 0.3 <= ps.mean() <= 0.7
    assert np.mean(ps < 0.1) <= 0.25


def test_paired_pvalue_formula_and_holm():
    d = np.array([1.0, 2.0, -1.0, 0.0])
    p, p2 = paired_pvalue(d)
    assert p == pytest.approx((1 + 2) / 5) and p2 == pytest.approx(min(1, 2 * min(p, 1 - p)))
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, None]) == [0.5, None]


def test_compare_input_errors():
    a = vqa_rows(50, {"F": 0.7, "M": 0.7})
    b = [dict(r, id="x" + r["id"]) for r in a]
    with pytest.raises(FairllavaError, match="share no sample ids"):
        compare(a, b, "vqa", metrics=["accuracy"], n_boot=10)
    c = [dict(r) for r in a[:40]]
    with pytest.raises(FairllavaError, match="mismatched ids"):
        compare(a, c, "vqa", metrics=["accuracy"], n_boot=10, strict_ids=True)
    res = compare(a, c, "vqa", metrics=["accuracy"], n_boot=10, n_min=5)
    assert res.meta["n_shared"] == 40 and res.meta["n_only_first"] == 10
    d = [dict(r) for r in a]
    d[3] = dict(d[3], label="NV" if d[3]["label"] == "MEL" else "MEL", reference="other")
    with pytest.raises(FairllavaError, match="differs"):
        compare(a, d, "vqa", metrics=["accuracy"], n_boot=10)


def test_bad_predictions_rows():
    rows = report_rows(30)
    with pytest.raises(FairllavaError, match="attribute 'ethnicity' is absent"):
        evaluate_predictions(rows, "report", attributes=["ethnicity"], metrics=["bleu4"], n_boot=0)
    bad = [dict(rows[0]), dict(rows[1])]
    del bad[1]["reference"]
    with pytest.raises(FairllavaError, match=r"row 1 \(id=r1\): missing field\(s\) reference"):
        evaluate_predictions(bad, "report", n_boot=0)
    with pytest.raises(FairllavaError, match="duplicate id"):
        evaluate_predictions([rows[0], rows[0]], "report", n_boot=0)
    with pytest.raises(FairllavaError, match="label 'XYZ'"):
        evaluate_predictions([{"id": "1", "prediction": "", "reference": "", "label": "XYZ", "attributes": {}}], "vqa", n_boot=0)


def test_intersections_and_stratified_gap():
    rows = report_rows(300)
    res = evaluate_predictions(rows, "report", attributes=["sex", "age_group"], metrics=["rouge_l"], n_boot=0,
                               intersections=True, n_min=5)
    assert "sex&age_group" in res.attributes
    assert sum(v["n"] for v in res.groups["sex&age_group"].values()) == sum(r["attributes"]["sex"] is not None for r in rows)
    sg = stratified_gap(res, "sex", "rouge_l", n_min=5)
    # hand-check: gaps within each age stratum, n-weighted
    scores = {s["id"]: s["rouge_l"] for s in res.per_sample}
    gaps, ws = [], []
    for age in ("0-44", "45-65", "66+"):
        vals = {g: [scores[r["id"]] for r in rows if r["attributes"]["age_group"] == age and r["attributes"]["sex"] == g]
                for g in "FM"}
        means = [np.mean(v) for v in vals.values()]
        gaps.append(max(means) - min(means))
        ws.append(sum(len(v) for v in vals.values()))
    assert sg["gap"] == pytest.approx(np.average(gaps, weights=ws))
    assert len(sg["strata"]) == 3 and sg["skipped"] == []
    assert stratified_gap(res, "sex", "rouge_l", n_min=1000)["gap"] is None


def test_counterfactual_pairs_greedy_within_label_buckets():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 1], [1, 0.05], [0, 1]], dtype=float)
    sex = ["F", "M", "F", "M", "M", None]
    keys = ["k1", "k1", "k2", "k2", "k1", "k2"]
    pairs = match_pairs(emb, sex, keys)
    assert {(i, j) for i, j, _ in pairs} == {(0, 4), (2, 3)}
    assert match_pairs(emb, sex, keys, min_similarity=0.9999) == []
    out = counterfactual_gap({"m": np.array([10.0, 0, 50, 40, 30, 0])}, pairs, n_boot=100)
    assert out["m"]["n_pairs"] == 2 and out["m"]["mean_abs_diff"] == pytest.approx(15.0)
    lo, hi = out["m"]["ci"]
    assert 10 <= lo <= hi <= 20


def test_report_label_keys_bucket_by_findings_and_view():
    from fairllava.fairness import report_label_keys

    keys = report_label_keys(["Small left pleural effusion.", "There is a left pleural effusion.", "Lungs are clear."],
                             extra=["PA", "PA", "PA"])
    assert keys[0] == keys[1] != keys[2]
