"""Report-generation text metrics, all in percent.

BLEU-1..4 are sacrebleu's corpus BLEU (13a tokeniser, exp smoothing) rebuilt from per-sentence
sufficient statistics extracted with sacrebleu's own tokeniser and n-gram helper, so the BLEU of any
group or bootstrap resample is ``bleu_from_sums(sum of rows)`` and equals ``sacrebleu.corpus_bleu`` on
that subset (tested to 1e-9). ROUGE-L (rouge-score, stemmer on), METEOR 1.5 (pycocoevalcap, Java) and
CIDEr-D (pycocoevalcap, IDF from the whole evaluated reference set) are per-sample scores, averaged.
An empty prediction scores 0 on every metric.

CIDEr scale: pycocoevalcap's CIDEr-D is ``10/4 · Σ_n cos_n · penalty`` and so lies in [0, 10]. It is reported as
**percent of that maximum**, ``10 × CIDEr-D`` (0–100), like every other metric, so ES-CIDEr divides by the same
kind of gap as ES-BLEU. (Captioning papers print ``100 × CIDEr-D``, i.e. 10 × the value here.)
"""
from __future__ import annotations

import importlib.metadata
import re
import shutil
from typing import Sequence

import numpy as np

from .base import MetricStats, mean_metric

MAX_ORDER = 4
BLEU_STAT_COLUMNS = ["hyp_len", "ref_len"] + [f"correct{n}" for n in range(1, 5)] + [f"total{n}" for n in range(1, 5)]
TEXT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor", "cider")
_LOG_ZERO = -9999999999.0  # sacrebleu.utils.my_log(0)


class MetricUnavailable(RuntimeError):
    """A metric cannot run in this environment (e.g. no Java); the reason is recorded, not fatal."""


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tokenizer():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-sentence BLEU statistics ``[N, 10]`` (columns ``BLEU_STAT_COLUMNS``), exactly as sacrebleu counts them."""
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    tok = _tokenizer()
    out = np.zeros((len(predictions), 2 + 2 * MAX_ORDER), dtype=np.float64)
    for i, (hyp, ref) in enumerate(zip(predictions, references)):
        ref_ngrams, ref_len = extract_all_word_ngrams(tok(ref.rstrip()), 1, MAX_ORDER)
        hyp_ngrams, hyp_len = extract_all_word_ngrams(tok(hyp.rstrip()), 1, MAX_ORDER)
        row = out[i]
        row[0], row[1] = hyp_len, ref_len
        for ngram, count in hyp_ngrams.items():
            n = len(ngram) - 1
            row[2 + MAX_ORDER + n] += count
            if ngram in ref_ngrams:
                row[2 + n] += min(count, ref_ngrams[ngram])
    return out


def bleu_from_sums(sums: np.ndarray, order: int = 4) -> np.ndarray:
    """sacrebleu ``BLEU.compute_bleu`` (exp smoothing) vectorised over the leading axes of ``sums[..., 10]``."""
    sums = np.asarray(sums, dtype=np.float64)
    sys_len, ref_len = sums[..., 0], sums[..., 1]
    correct = sums[..., 2 : 2 + order]
    total = sums[..., 2 + MAX_ORDER : 2 + MAX_ORDER + order]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bp = np.where(sys_len < ref_len, np.where(sys_len > 0, np.exp(1.0 - ref_len / np.where(sys_len > 0, sys_len, 1)), 0.0), 1.0)
        smooth = np.ones_like(sys_len)
        active = np.ones(sys_len.shape, dtype=bool)
        log_sum = np.zeros_like(sys_len)
        for n in range(order):
            c, t = correct[..., n], total[..., n]
            active = active & (t > 0)  # sacrebleu breaks out of the loop at the first empty order
            zero = c == 0
            smooth = np.where(active & zero, smooth * 2.0, smooth)
            safe_t = np.where(t > 0, t, 1.0)
            p = np.where(active, np.where(zero, 100.0 / (smooth * safe_t), 100.0 * c / safe_t), 0.0)
            log_sum = log_sum + np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), _LOG_ZERO)
        score = bp * np.exp(log_sum / order)
        score = np.where(np.any(correct > 0, axis=-1), score, 0.0)
    return score


def _bleu_reducer(order: int):
    def reduce(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(n) > 0, bleu_from_sums(sums, order), np.nan)

    return reduce


def bleu_metrics(predictions: Sequence[str], references: Sequence[str], orders=(1, 2, 3, 4)) -> dict[str, MetricStats]:
    stats = bleu_stats(predictions, references)
    meta = {"package": "sacrebleu", "version": _version("sacrebleu"), "variant": "corpus BLEU, tokenize=13a, smooth=exp",
            "scale": "percent", "level": "corpus"}
    return {f"bleu{k}": MetricStats(f"bleu{k}", stats, _bleu_reducer(k), "corpus", None, dict(meta, max_ngram_order=k))
            for k in orders}


def sentence_bleu_scores(predictions: Sequence[str], references: Sequence[str], order: int = 4) -> np.ndarray:
    """sacrebleu sentence BLEU (effective order, exp smoothing) per sample — the HAM answer-text metric."""
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU(max_ngram_order=order, effective_order=True)
    return np.array([bleu.sentence_score(h, [r]).score if h.strip() else 0.0 for h, r in zip(predictions, references)],
                    dtype=np.float64)


def sentence_bleu_metric(predictions: Sequence[str], references: Sequence[str], order: int) -> MetricStats:
    return mean_metric(f"bleu{order}", sentence_bleu_scores(predictions, references, order), {
        "package": "sacrebleu", "version": _version("sacrebleu"), "scale": "percent", "level": "per-sample mean",
        "variant": f"sentence BLEU (max order {order}, effective order), averaged"})


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """rouge-score ROUGE-L F-measure per sample (stemmer on), in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([100.0 * scorer.score(ref, hyp)["rougeL"].fmeasure if hyp.strip() else 0.0
                     for hyp, ref in zip(predictions, references)], dtype=np.float64)


def _coco_tokens(text: str) -> str:
    """Lower-cased 13a tokens without pure-punctuation tokens (stands in for the Java PTB tokenizer)."""
    toks = _tokenizer()(text.lower().strip()).split()
    return " ".join(t for t in toks if re.search(r"\w", t))


#: CIDEr-D lies in [0, 10]; x10 puts it on the percent-of-maximum scale of every other metric.
CIDER_TO_PERCENT = 10.0


def cider_scores(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """pycocoevalcap CIDEr-D per sample (sigma=6, clipped), IDF from all references given, in percent of its
    maximum 10 (i.e. ×10; see the module docstring)."""
    from pycocoevalcap.cider.cider import Cider

    if len(references) < 2:
        raise MetricUnavailable("CIDEr-D needs at least 2 references for its IDF")
    gts = {i: [_coco_tokens(r)] for i, r in enumerate(references)}
    res = {i: [_coco_tokens(h)] for i, h in enumerate(predictions)}
    _, scores = Cider().compute_score(gts, res)
    scores = CIDER_TO_PERCENT * np.asarray(scores, dtype=np.float64)
    scores[[not h.strip() for h in predictions]] = 0.0
    return scores


def meteor_scores(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """pycocoevalcap METEOR 1.5 per sample (Java subprocess), ×100; empty predictions score 0 without Java."""
    if shutil.which("java") is None:
        raise MetricUnavailable("java not found on PATH (METEOR 1.5 runs as a Java program)")
    from pycocoevalcap.meteor.meteor import Meteor

    def clean(s: str) -> str:
        return " ".join(s.replace("|||", " ").split())

    keep = [i for i, h in enumerate(predictions) if h.strip()]
    out = np.zeros(len(predictions), dtype=np.float64)
    if not keep:
        return out
    try:
        scorer = Meteor()
        try:
            _, scores = scorer.compute_score({i: [clean(references[i])] for i in keep}, {i: [clean(predictions[i])] for i in keep})
        finally:
            del scorer
    except (OSError, ValueError, BrokenPipeError) as e:
        raise MetricUnavailable(f"METEOR Java process failed: {type(e).__name__}: {e}") from None
    out[keep] = 100.0 * np.asarray(scores, dtype=np.float64)
    return out


def text_metrics(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str] = TEXT_METRICS
                 ) -> tuple[dict[str, MetricStats], dict[str, str]]:
    """Build the requested text metrics; returns ``(metrics, skipped)`` where skipped maps name -> reason."""
    unknown = [m for m in metrics if m not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"unknown text metric(s) {unknown}; choose from {list(TEXT_METRICS)}")
    out: dict[str, MetricStats] = {}
    skipped: dict[str, str] = {}
    orders = [int(m[-1]) for m in metrics if m.startswith("bleu")]
    if orders:
        out.update(bleu_metrics(predictions, references, orders))
    if "rouge_l" in metrics:
        out["rouge_l"] = mean_metric("rouge_l", rouge_l_scores(predictions, references), {
            "package": "rouge-score", "version": _version("rouge-score"), "variant": "rougeL F-measure, use_stemmer=True",
            "scale": "percent (x100)", "level": "per-sample mean"})
    for name, fn, variant, scale in (
            ("meteor", meteor_scores, "METEOR 1.5 (-l en -norm), per-sample scores averaged", "percent (x100)"),
            ("cider", cider_scores, "CIDEr-D (n=4, sigma=6), IDF from the evaluated reference set, per-sample averaged",
             "percent of the CIDEr-D maximum 10 (x10 of pycocoevalcap; captioning papers' 'CIDEr' = 10 x this)")):
        if name not in metrics:
            continue
        try:
            scores = fn(predictions, references)
        except MetricUnavailable as e:
            skipped[name] = str(e)
            continue
        out[name] = mean_metric(name, scores, {"package": "pycocoevalcap", "version": _version("pycocoevalcap"),
                                               "variant": variant, "scale": scale, "level": "per-sample mean"})
    return out, skipped
