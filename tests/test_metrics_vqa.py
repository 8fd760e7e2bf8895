import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from fairllava.metrics.vqa import UNK, LabelSet, vqa_metrics


@pytest.mark.parametrize("text,code", [
    ("This is a melanocytic nevus.", "NV"),
    ("Melanoma, not a nevus", "MEL"),
    ("A nevus rather than melanoma", "NV"),
    ("The answer is BCC", "BCC"),
    ("seborrheic keratosis", "BKL"),
    ("Bowen's disease", "AKIEC"),
    ("pyogenic granuloma (vascular)", "VASC"),
    ("dermatofibroma", "DF"),
    ("nvx or melanomas", UNK),  # word boundaries
    ("", UNK),
])
def test_ham_parsing(text, code):
    assert LabelSet.ham().parse(text) == code


def test_custom_label_subset_ignores_other_classes():
    L = LabelSet.ham(["MEL", "NV", "VASC"])
    assert L.parse("bcc, or maybe an angioma") == "VASC"
    assert L.parse("bcc") == UNK
    with pytest.raises(ValueError):
        LabelSet(["A", "a"])


def test_vqa_metrics_match_sklearn_on_subsets():
    rng = np.random.default_rng(0)
    codes = ["MEL", "NV", "VASC", "BCC"]
    y = list(rng.choice(codes, size=200, p=[0.3, 0.5, 0.1, 0.1]))
    preds = [t if rng.random() < 0.6 else rng.choice(codes + ["something else"]) for t in y]
    m, parsed = vqa_metrics(preds, y, LabelSet.ham(codes))
    for idx in (np.arange(200), np.arange(0, 200, 3), np.arange(50)):
        yt = [y[i] for i in idx]
        yp = [parsed[i] for i in idx]
        present = sorted(set(yt))
        assert abs(m["accuracy"].value(idx) - 100 * np.mean([a == b for a, b in zip(yt, yp)])) < 1e-9
        assert abs(m["macro_f1"].value(idx) - 100 * f1_score(yt, yp, labels=present, average="macro", zero_division=0)) < 1e-9
        # balanced accuracy = mean recall over classes present in y_true (UNK counts as wrong)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = balanced_accuracy_score(yt, yp)
        assert abs(m["balanced_accuracy"].value(idx) - 100 * exp) < 1e-9


def test_unknown_true_label_rejected():
    with pytest.raises(ValueError, match="not one of"):
        vqa_metrics(["mel"], ["XYZ"], LabelSet.ham())
