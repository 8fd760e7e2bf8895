"""Fairness evaluation: per-group metrics, gaps, equity-scaled scores, bootstrap CIs and paired tests."""
from .bootstrap import bootstrap_scores, iter_resample_weights, percentile_ci, resample_weights, rng_for
from .compare import ComparisonResult, compare, holm, paired_pvalue
from .counterfactual import counterfactual_gap, match_pairs, report_label_keys
from .evaluate import EvalData, FairnessResult, evaluate_predictions, load_predictions
from .frame import ES_VARIANTS, GroupIndex, frame_scores, group_index
from .stratified import stratified_gap, stratified_gaps


def write_evaluation(result, out_dir, overwrite: bool = False):
    """See :func:`fairllava.report.write_evaluation` (re-exported here; imports matplotlib lazily)."""
    from ..report import write_evaluation as _w

    return _w(result, out_dir, overwrite=overwrite)


def write_comparison_report(results, pvalues, out_dir, overwrite: bool = False, meta=None, audit=None):
    """See :func:`fairllava.report.write_comparison_report`."""
    from ..report import write_comparison_report as _w

    return _w(results, pvalues, out_dir, overwrite=overwrite, meta=meta, audit=audit)


__all__ = [
    "bootstrap_scores", "iter_resample_weights", "percentile_ci", "resample_weights", "rng_for", "ComparisonResult", "compare", "holm", "paired_pvalue",
    "counterfactual_gap", "match_pairs", "report_label_keys", "EvalData", "FairnessResult", "evaluate_predictions", "load_predictions",
    "ES_VARIANTS", "GroupIndex", "frame_scores", "group_index", "stratified_gap", "stratified_gaps",
    "write_evaluation", "write_comparison_report",
]
