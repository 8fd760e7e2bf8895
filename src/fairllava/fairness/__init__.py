"""Fairness evaluation: per-group metrics, gaps, equity-scaled scores, bootstrap CIs and paired tests.

Inference API (issue 12; signatures in docs/evaluation.md):
``signed_gap(metric, values, direction, ...)``, ``paired_signed_gap(baseline, method, values, direction, ...)``,
``compare_systems(baseline_file, method_file, task, directions=[...], rate_labels=[...], primary=[...])``,
``pool_seeds([(base_file, method_file), ...], direction, task, metric=...)`` / ``pool_paired([SeedPair...], ...)``,
``rate_metric(predicted, true, label)`` (false-positive rate), ``mcnemar_exact`` / ``mcnemar_by_group``,
``all_groups_equal_pvalue``, and the direction helpers ``parse_direction``, ``directions_from_datacard``,
``direction_from_file``.
"""
from .bootstrap import (bca_ci, bootstrap_scores, cluster_inverse, iter_resample_weights, percentile_ci,
                        resample_weights, rng_for)
from .compare import ComparisonResult, compare, compare_systems, holm, load_pair, paired_pvalue
from .paired import mcnemar_by_group, mcnemar_exact, paired_signed_gap
from .permutation import all_groups_equal_pvalue
from .pooling import SeedPair, pool_paired, pool_seeds
from .signed import (KEY_METRIC, Direction, as_direction, direction_from_file, directions_from_datacard,
                     directions_from_file,
                     parse_direction, rate_metric, signed_gap)
from .counterfactual import counterfactual_gap, match_pairs, report_label_keys
from .evaluate import EvalData, FairnessResult, evaluate_predictions, load_predictions
from .frame import ES_VARIANTS, GroupIndex, frame_scores, group_index
from .stratified import stratified_gap, stratified_gaps


def write_evaluation(result, out_dir, overwrite: bool = False):
    """See :func:`fairllava.report.write_evaluation` (re-exported here; imports matplotlib lazily)."""
    from ..report import write_evaluation as _w

    return _w(result, out_dir, overwrite=overwrite)


def write_comparison_report(results, pvalues, out_dir, overwrite: bool = False, meta=None, audit=None, **kw):
    """See :func:`fairllava.report.write_comparison_report`."""
    from ..report import write_comparison_report as _w

    return _w(results, pvalues, out_dir, overwrite=overwrite, meta=meta, audit=audit, **kw)


__all__ = [
    "bca_ci", "cluster_inverse", "compare_systems", "load_pair", "mcnemar_by_group", "mcnemar_exact", "paired_signed_gap",
    "all_groups_equal_pvalue", "SeedPair", "pool_paired", "pool_seeds", "KEY_METRIC", "Direction", "as_direction",
    "direction_from_file", "directions_from_datacard", "directions_from_file", "parse_direction", "rate_metric", "signed_gap",
    "bootstrap_scores", "iter_resample_weights", "percentile_ci", "resample_weights", "rng_for", "ComparisonResult", "compare", "holm", "paired_pvalue",
    "counterfactual_gap", "match_pairs", "report_label_keys", "EvalData", "FairnessResult", "evaluate_predictions", "load_predictions",
    "ES_VARIANTS", "GroupIndex", "frame_scores", "group_index", "stratified_gap", "stratified_gaps",
    "write_evaluation", "write_comparison_report",
]
