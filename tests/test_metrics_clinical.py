import numpy as np
import pytest
from sklearn.metrics import f1_score

from fairllava.errors import FairllavaError
from fairllava.metrics.chexpert_rules import CONDITIONS, CONDITIONS_5, binarize, keyword_f1_metrics, label_report
from fairllava.metrics.clinical import CheXbertLabeler, RadGraphScorer, clinical_metrics


def _lab(text):
    return {c: v for c, v in zip(CONDITIONS, label_report(text)) if v == v}


def test_rule_labeler_negation_uncertainty_and_no_finding():
    lab = _lab("No pleural effusion or pneumothorax. The heart is mildly enlarged.")
    assert lab["Pleural Effusion"] == 0 and lab["Pneumothorax"] == 0 and lab["Cardiomegaly"] == 1
    assert lab["No Finding"] == 0
    lab = _lab("Possible left lower lobe pneumonia. Endotracheal tube in place.")
    assert lab["Pneumonia"] == -1 and lab["Support Devices"] == 1
    assert _lab("Lungs are clear.")["No Finding"] == 1
    lab = _lab("Mild pulmonary edema but no focal consolidation.")
    assert lab["Edema"] == 1 and lab["Consolidation"] == 0


def test_keyword_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    phrases = ["pleural effusion", "no pleural effusion", "cardiomegaly", "possible pneumonia", "atelectasis",
               "no pneumothorax", "edema", "lungs are clear", "chest tube", "rib fracture", "lung nodule"]
    preds = [". ".join(rng.choice(phrases, size=rng.integers(1, 4))) for _ in range(120)]
    refs = [". ".join(rng.choice(phrases, size=rng.integers(1, 4))) for _ in range(120)]
    m = keyword_f1_metrics(preds, refs)
    from fairllava.metrics.chexpert_rules import label_reports
    P, R = binarize(label_reports(preds)), binarize(label_reports(refs))
    idx5 = [CONDITIONS.index(c) for c in CONDITIONS_5]
    sub = np.arange(0, 120, 2)
    for cols, tag in ((slice(None), "14"), (idx5, "5")):
        for avg in ("micro", "macro"):
            exp = 100 * f1_score(R[sub][:, cols], P[sub][:, cols], average=avg, zero_division=0)
            assert abs(m[f"keyword_f1_{avg}_{tag}"].value(sub) - exp) < 1e-9


class FakeLabeler:
    name = "chexbert"

    def label(self, texts):
        return np.stack([label_report(t) for t in texts])


class FakeScorer:
    name = "radgraph_f1"

    def score(self, predictions, references):
        return np.array([1.0 if p == r else 0.25 for p, r in zip(predictions, references)])


def test_injected_scorers_become_metrics():
    preds, refs = ["cardiomegaly", "no effusion"], ["cardiomegaly", "pleural effusion"]
    m = clinical_metrics(preds, refs, [FakeLabeler(), FakeScorer()])
    assert set(m) >= {"chexbert_f1_micro_14", "chexbert_f1_macro_5", "radgraph_f1"}
    assert m["radgraph_f1"].value() == pytest.approx(62.5)


def test_missing_optional_packages_give_clear_errors(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake_import(name, *a, **k):
        if name.split(".")[0] in ("f1chexbert", "radgraph"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(FairllavaError, match="pip install f1chexbert"):
        CheXbertLabeler()
    with pytest.raises(FairllavaError, match="pip install radgraph"):
        RadGraphScorer()


def test_rule_labeler_agrees_with_iu_mesh_tags():
    """Sanity floor for the approximation on real IU X-ray reports (read from the wheel; nothing stored)."""
    import importlib.util

    from fairllava.metrics.chexpert_rules import iu_mesh_agreement

    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision wheel (IU X-ray reports) not installed")
    r = iu_mesh_agreement()
    assert r["n_reports"] > 3000
    assert r["micro_f1"] > 65 and r["conditions"]["Pleural Effusion"]["f1"] > 70
