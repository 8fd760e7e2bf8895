"""Layer-wise leakage audit (issue 7): linear probes on pooled hidden states, per layer and attribute.

``run_audit`` streams each model over the data (pooled features cached, resumable), fits grouped-CV
probes and writes audit.json, leakage plots and audit.md. See docs/audit.md.
"""
from .audit import AuditConfig, audit_features, audit_markdown, plot_leakage, run_audit, write_audit
from .counterfactual import run_counterfactual
from .features import FeatureConfig, FeatureSet, extract_features, load_features, parse_layers
from .probes import ProbeConfig, club_estimate, fit_probe, grouped_folds, score_probe

__all__ = [
    "AuditConfig", "FeatureConfig", "FeatureSet", "ProbeConfig", "audit_features", "audit_markdown", "club_estimate",
    "extract_features", "fit_probe", "grouped_folds", "load_features", "parse_layers", "plot_leakage", "run_audit", "run_counterfactual",
    "score_probe", "write_audit",
]
