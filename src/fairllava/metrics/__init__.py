"""Task metrics in percent, each as per-sample sufficient statistics (:class:`MetricStats`)."""
from .base import MetricStats, mean_metric
from .chexpert_rules import CONDITIONS, CONDITIONS_5, keyword_f1_metrics, label_report, label_reports
from .clinical import CheXbertLabeler, GreenScorer, RadGraphScorer, ReportLabeler, SampleScorer, clinical_metrics
from .text import TEXT_METRICS, MetricUnavailable, bleu_from_sums, bleu_stats, text_metrics
from .vqa import UNK, LabelSet, parse_labels, vqa_metrics

__all__ = [
    "MetricStats", "mean_metric", "CONDITIONS", "CONDITIONS_5", "keyword_f1_metrics", "label_report", "label_reports",
    "CheXbertLabeler", "GreenScorer", "RadGraphScorer", "ReportLabeler", "SampleScorer", "clinical_metrics",
    "TEXT_METRICS", "MetricUnavailable", "bleu_from_sums", "bleu_stats", "text_metrics",
    "UNK", "LabelSet", "parse_labels", "vqa_metrics",
]
