"""Simulation checks of the benchmark's statistics adapter (pooled over seeds, random-effects SE)."""
from __future__ import annotations

import numpy as np
import pytest

from fairllava.benchmark.stats import SeedData, paired_effect, pooled
from fairllava.errors import FairllavaError
from fairllava.metrics.base import mean_metric

N = 150  # per group, as on the benchmark's test split


def _seed(rng, seed: int, p_light: float, p_dark: float, correct=None) -> SeedData:
    values = ["light"] * N + ["dark"] * N
    if correct is None:
        correct = np.concatenate([rng.random(N) < p_light, rng.random(N) < p_dark])
    labels = [["MEL", "NV", "VASC"][i % 3] for i in range(2 * N)]
    return SeedData(seed, [str(i) for i in range(2 * N)], values, labels, np.arange(2 * N),
                    {"accuracy": mean_metric("accuracy", 100.0 * correct)}, "race")


def test_pooled_signed_gap_covers_the_mean_gap_under_seed_to_seed_variation():
    rng = np.random.default_rng(0)
    cover, n_sim = 0, 120
    for sim in range(n_sim):
        seeds = []
        for k in range(3):
            g = (10 + rng.normal(0, 2)) / 100  # each seed's true gap varies around 10 points
            seeds.append(_seed(rng, k, 0.7 + g / 2, 0.7 - g / 2))
        ci = pooled(seeds, "accuracy", "signed_gap", ("light", "dark"), n_boot=200, seed=sim)["ci"]
        cover += ci[0] <= 10 <= ci[1]
    assert 0.88 <= cover / n_sim <= 0.995


def test_pooled_signed_gap_type_one_error_and_power():
    rng = np.random.default_rng(1)
    null = [pooled([_seed(rng, k, 0.7, 0.7) for k in range(3)], "accuracy", "signed_gap", ("light", "dark"),
                   n_boot=200, seed=s)["p_value"] for s in range(100)]
    alt = [pooled([_seed(rng, k, 0.74, 0.66) for k in range(3)], "accuracy", "signed_gap", ("light", "dark"),
                  n_boot=200, seed=s)["p_value"] for s in range(60)]
    assert np.mean(np.array(null) < 0.05) <= 0.10
    assert np.mean(np.array(alt) < 0.05) >= 0.6  # 8 points, 3 seeds x 150 per group


def test_paired_effect_is_exact_on_identical_systems_and_calibrated_under_the_null():
    rng = np.random.default_rng(2)
    base = [_seed(rng, k, 0.7, 0.6) for k in range(2)]
    same = paired_effect(base, base, "accuracy", "overall", ("light", "dark"), n_boot=100, n_perm=100)
    assert same["value"] == 0 and same["ci"] == pytest.approx([0, 0])
    ps = []
    for s in range(80):
        b, m = [], []
        for k in range(2):
            shared = rng.random(2 * N) < 0.65  # the two fine-tunes agree on most samples
            flip = rng.random(2 * N) < 0.2
            other = np.where(flip, rng.random(2 * N) < 0.65, shared)
            b.append(_seed(rng, k, 0, 0, shared))
            m.append(_seed(rng, k, 0, 0, other))
        ps.append(paired_effect(b, m, "accuracy", "overall", ("light", "dark"), n_boot=200, n_perm=0, seed=s)["p_value"])
    assert np.mean(np.array(ps) < 0.05) <= 0.12


def test_power_follows_the_variance_model():
    from scipy.stats import norm
    from scipy.stats import t as student

    from fairllava.benchmark.power import power_markdown, power_table

    def cell(v, se, tau2, S):
        return {"value": v, "se": se, "tau2": tau2, "seeds": list(range(S))}

    gap = {"signed_gap": cell(10.0, 3.0, 4.0, 2)}
    board = {"plan": {"primary": {"strength": 1.0}, "tasks": {"derm-vqa": {"data": {"n_test_per_cell": 50}}}},
             "baseline": "lora", "alpha": 0.05, "family": {"size": 1},
             "rows": [{"task": "derm-vqa", "strength": 1.0, "split": "test", "method": "lora", "primary_metric": "accuracy",
                       "metrics": {"accuracy": gap}, "vs_baseline": None},
                      {"task": "derm-vqa", "strength": 1.0, "split": "test", "method": "m", "primary_metric": "accuracy",
                       "metrics": {"accuracy": gap},
                       "vs_baseline": {"metrics": {"accuracy": {"signed_gap": cell(-2.0, 2.0, 1.0, 2)}}}}]}
    res = power_table(board, "derm-vqa", seeds=(2, 5, 20), n_per_cell=(50, 200))
    sigma2 = (2.0 ** 2 - 1.0 / 2) * 2  # within-seed variance of the paired difference at 50 per cell
    assert res["tau2"] == 1.0 and res["sigma2"] == sigma2
    p = {(r["n_per_cell"], r["seeds"]): r["power"] for r in res["table"]}
    se = ((1.0 + sigma2 * 50 / 200) / 5) ** 0.5
    # tau^2 > 0: the pooled test's reference is Student t with S - 1 df, and so is the power's
    assert p[(200, 5)] == pytest.approx(student.cdf(5.0 / se - student.ppf(0.975, 4), 4), rel=1e-12)
    assert p[(200, 5)] < norm.cdf(5.0 / se - norm.ppf(0.975))  # the normal would promise more than the test gives
    assert p[(50, 2)] < p[(50, 5)] < p[(50, 20)] and p[(50, 5)] < p[(200, 5)]
    assert "| 200 |" in power_markdown(res) and "Student t" in power_markdown(res)
    # no between-seed variance: the normal reference
    for r in board["rows"]:
        r["metrics"]["accuracy"]["signed_gap"]["tau2"] = 0.0
        if r["vs_baseline"]:
            r["vs_baseline"]["metrics"]["accuracy"]["signed_gap"]["tau2"] = 0.0
    res0 = power_table(board, "derm-vqa", seeds=(5,), n_per_cell=(200,))
    se0 = (res0["sigma2"] * 50 / 200 / 5) ** 0.5
    assert res0["table"][0]["power"] == pytest.approx(norm.cdf(5.0 / se0 - norm.ppf(0.975)), rel=1e-12)


def test_a_leaderboard_states_the_power_of_the_design_it_ran():
    """Protocol §7: the final board prints the power of its own seeds x size, beside the verdicts."""
    from fairllava.benchmark.power import design_power, design_power_text, power_table

    def cell(v, se, tau2, S):
        return {"value": v, "se": se, "tau2": tau2, "seeds": list(range(S))}

    def row(method, vs):
        return {"task": "derm-vqa", "strength": 1.0, "split": "test", "method": method, "primary_metric": "accuracy",
                "seeds": [2, 3, 4], "metrics": {"accuracy": {"signed_gap": cell(10.0, 3.0, 4.0, 3)}}, "vs_baseline": vs}

    board = {"plan": {"primary": {"strength": 1.0}, "tasks": {"derm-vqa": {"data": {"n_test_per_cell": 100}}}},
             "baseline": "lora", "alpha": 0.05, "family": {"size": 6},
             "rows": [row("lora", None), row("m", {"metrics": {"accuracy": {"signed_gap": cell(-2.0, 2.0, 1.0, 3)}}})]}
    (res,) = design_power(board)
    want = power_table(board, "derm-vqa", seeds=(3,), n_per_cell=(100,))["table"][0]["power"]
    assert res["seeds"] == 3 and res["n_per_cell"] == 100 and res["power"] == want and 0 < want < 1
    text = design_power_text(res)
    assert f"power {100 * want:.0f} %" in text and "3 seeds × 100 per cell" in text and "α = 0.05 / 6" in text
    board["rows"] = board["rows"][1:]  # no baseline row: nothing to say, and no error
    assert design_power(board) == []


def test_shortcut_target_is_the_tasks_label_also_at_s0():
    """At S = 0 the training probabilities are balanced; the signature must still measure the shortcut's label
    (a balanced card once made the cxr S = 0 column read "normal FPR")."""
    from fairllava.benchmark.stats import shortcut_target

    def card(minority, majority):
        return {"shortcut": {"train_minority_label_probs": minority, "train_majority_label_probs": majority}}

    balanced_cxr = card({"normal": 0.51, "abnormal": 0.49}, {"normal": 0.51, "abnormal": 0.49})
    assert shortcut_target(balanced_cxr, "cxr-report") == "abnormal"
    balanced_derm = card({"NV": 1 / 3, "MEL": 1 / 3, "VASC": 1 / 3}, {"NV": 1 / 3, "MEL": 1 / 3, "VASC": 1 / 3})
    assert shortcut_target(balanced_derm, "derm-vqa") == "MEL"
    s1_cxr = card({"normal": 0.15, "abnormal": 0.85}, {"normal": 0.51, "abnormal": 0.49})
    assert shortcut_target(s1_cxr, "cxr-report") == "abnormal"
    # another task: the label the minority is most enriched for relative to the majority (not the most frequent)
    other = card({"a": 0.6, "b": 0.4}, {"a": 0.8, "b": 0.2})
    assert shortcut_target(other, "my-task") == "b"
    # a renderer that enriches another label than the task's declared one is an error, not a silent mislabel
    with pytest.raises(FairllavaError, match="enriched for 'normal'.*shortcut label is 'abnormal'"):
        shortcut_target(card({"normal": 0.85, "abnormal": 0.15}, {"normal": 0.5, "abnormal": 0.5}), "cxr-report")


def test_power_uses_the_final_plans_family_not_the_selection_boards():
    """A selection board's own "family" is its 18 validation trials; the final test's is 6 methods x 2 tasks."""
    from pathlib import Path

    from fairllava.benchmark.plan import load_plan
    from fairllava.benchmark.power import family_size_of

    configs = Path(__file__).resolve().parents[1] / "configs" / "benchmark"
    finals = [load_plan(configs / f) for f in ("final-derm.yaml", "final-cxr.yaml")]
    assert family_size_of(finals) == 12 and family_size_of(finals[:1]) == 6
