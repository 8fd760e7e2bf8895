import random

import numpy as np
import pytest
import sacrebleu

from fairllava.metrics.text import bleu_metrics, bleu_stats, bleu_from_sums, cider_scores, rouge_l_scores, text_metrics

VOCAB = "the heart is normal size no effusion lungs clear pneumothorax . , left right mild edema ( ) 3cm XXXX".split()


def _corpus(n, seed):
    rng = random.Random(seed)
    preds = [" ".join(rng.choices(VOCAB, k=rng.randint(0, 25))) for _ in range(n)]
    refs = [" ".join(rng.choices(VOCAB, k=rng.randint(1, 25))) for _ in range(n)]
    preds[3] = ""  # empty prediction
    return preds, refs


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bleu_equals_sacrebleu_overall_and_per_group(order):
    preds, refs = _corpus(300, order)
    m = bleu_metrics(preds, refs, orders=(order,))[f"bleu{order}"]
    expected = sacrebleu.metrics.BLEU(max_ngram_order=order).corpus_score(preds, [refs]).score
    assert abs(m.value() - expected) < 1e-9
    groups = np.random.default_rng(order).integers(0, 4, size=len(preds))
    for g in range(4):
        idx = np.flatnonzero(groups == g)
        exp_g = sacrebleu.metrics.BLEU(max_ngram_order=order).corpus_score([preds[i] for i in idx], [[refs[i] for i in idx]]).score
        assert abs(m.value(idx) - exp_g) < 1e-9


def test_bleu_resample_equals_sacrebleu_on_duplicated_corpus():
    preds, refs = _corpus(120, 7)
    stats = bleu_stats(preds, refs)
    draw = np.random.default_rng(0).integers(0, len(preds), size=len(preds))
    w = np.bincount(draw, minlength=len(preds)).astype(float)
    ours = bleu_from_sums(w @ stats, 4)
    exp = sacrebleu.corpus_bleu([preds[i] for i in draw], [[refs[i] for i in draw]]).score
    assert abs(float(ours) - exp) < 1e-9


def test_bleu_degenerate_cases_match_sacrebleu():
    cases = [(["a"], ["a b c d e"]), (["x y"], ["a b"]), ([""], ["a b"]), (["a b c"], ["a b c"])]
    for p, r in cases:
        m = bleu_metrics(p, r)["bleu4"]
        assert abs(m.value() - sacrebleu.corpus_bleu(p, [r]).score) < 1e-9


def test_empty_prediction_scores_zero():
    preds, refs = ["", "the heart"], ["the heart is normal", "the heart is normal"]
    assert rouge_l_scores(preds, refs)[0] == 0.0
    assert cider_scores(preds, refs)[0] == 0.0


def test_cider_average_matches_pycocoevalcap_mean():
    from pycocoevalcap.cider.cider import Cider

    from fairllava.metrics.text import _coco_tokens

    preds, refs = _corpus(50, 3)
    preds[3] = "x"  # keep non-empty so the package mean is comparable
    ours = cider_scores(preds, refs)
    mean, _ = Cider().compute_score({i: [_coco_tokens(r)] for i, r in enumerate(refs)},
                                    {i: [_coco_tokens(p)] for i, p in enumerate(preds)})
    assert abs(ours.mean() - 10 * mean) < 1e-9  # percent of CIDEr-D's maximum 10


def test_cider_on_the_percent_scale_and_es_consistent():
    """CIDEr never leaves 0-100, a verbatim rare-word answer reaches ~100, and ES uses that scale."""
    from fairllava.fairness import evaluate_predictions

    preds, refs = _corpus(40, 5)
    for p in (preds, refs, [r for r in refs]):
        assert np.all((cider_scores(p, refs) >= 0) & (cider_scores(p, refs) <= 100 + 1e-9))
    unique = [f"finding{i} alpha{i} beta{i} gamma{i} delta{i}" for i in range(10)]
    assert np.all(cider_scores(unique, unique) > 99)
    rows = [{"id": str(i), "prediction": p, "reference": r, "attributes": {"g": "ab"[i % 2]}}
            for i, (p, r) in enumerate(zip(preds, refs))]
    res = evaluate_predictions(rows, "report", metrics=["cider"], n_boot=0, n_perm=0, n_min=5)
    scores = cider_scores(preds, refs)
    assert res.overall["cider"] == pytest.approx(scores.mean())
    gap = abs(scores[0::2].mean() - scores[1::2].mean())
    assert res.es["g"]["cider"] == pytest.approx(scores.mean() / (1 + gap))
    assert res.meta["metrics"]["cider"]["scale"].startswith("percent of the CIDEr-D maximum")


def test_meteor_skipped_with_reason_without_java(monkeypatch):
    import fairllava.metrics.text as T

    monkeypatch.setattr(T.shutil, "which", lambda _: None)
    metrics, skipped = text_metrics(["a b"], ["a b"], ["bleu4", "meteor"])
    assert "meteor" not in metrics and "java" in skipped["meteor"]
    assert "bleu4" in metrics


def test_unknown_metric_is_an_argument_error():
    with pytest.raises(ValueError, match="unknown text metric"):
        text_metrics(["a"], ["a"], ["blue"])


@pytest.mark.slow
def test_meteor_runs_with_java():
    import shutil

    if shutil.which("java") is None:
        pytest.skip("java not installed")
    metrics, skipped = text_metrics(["the heart is normal", "", "no effusion"], ["the heart is normal", "lungs clear",
                                                                                  "no pleural effusion"], ["meteor"])
    s = metrics["meteor"].per_sample
    assert s[1] == 0.0 and s[0] > 90 and 0 < s[2] < 100
