"""Layer-wise leakage audit: how well can a linear probe read each demographic attribute from each layer?

Why: the paper's mechanism is that hidden states carry demographic shortcuts and the method removes
them (METHOD.md). The audit shows it on the user's own models, layer by layer, before and after
fine-tuning: several models are compared on the same patient-level folds and the same bootstrap
resamples, so their curves differ only because the models differ.
"""
from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import FairllavaError
from ..io import atomic_path, atomic_write_json, atomic_write_text
from .features import FeatureConfig, FeatureSet, extract_features
from .probes import ProbeConfig, fit_probe, grouped_folds, score_probe

AUDIT_VERSION = 1


@dataclass
class AuditConfig:
    """Everything that determines an audit's numbers (written into audit.json)."""

    attributes: list[str] = field(default_factory=lambda: ["race", "sex", "age_group"])
    features: FeatureConfig = field(default_factory=FeatureConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    min_per_class: int = 2  # classes with fewer labelled samples are dropped from an attribute's probe

    def validate(self) -> None:
        if not self.attributes:
            raise ValueError("attributes: expected at least one attribute name")
        self.features.validate()
        self.probe.validate()


def _attribute_labels(records: Sequence[dict], name: str, vocabs: Mapping | None, min_per_class: int):
    """(sample indices with a value, integer labels, class names); missing values are left out."""
    values = [(r.get("attributes") or {}).get(name) for r in records]
    if vocabs and name in vocabs:
        voc = vocabs[name]
        enc = [voc.encode(v) for v in values]
        classes = list(voc.classes)
        idx = [i for i, c in enumerate(enc) if c >= 0]
        y = np.array([enc[i] for i in idx], dtype=np.int64)
    else:
        present = sorted({str(v) for v in values if v is not None and str(v).strip()})
        classes = present
        idx = [i for i, v in enumerate(values) if v is not None and str(v).strip()]
        y = np.array([classes.index(str(values[i])) for i in idx], dtype=np.int64)
    counts = np.bincount(y, minlength=len(classes)) if len(y) else np.zeros(len(classes), dtype=int)
    keep = [k for k in range(len(classes)) if counts[k] >= min_per_class]
    if len(keep) < 2:
        return None
    remap = {k: j for j, k in enumerate(keep)}
    sel = [j for j, lab in enumerate(y) if int(lab) in remap]
    return (np.array([idx[j] for j in sel], dtype=np.int64), np.array([remap[int(y[j])] for j in sel]),
            [classes[k] for k in keep])


def audit_features(features: Mapping[str, FeatureSet], records: Sequence[dict], cfg: AuditConfig | None = None,
                   vocabs: Mapping | None = None, progress: bool = False) -> dict:
    """Probe every model x layer x attribute on pooled features; the core of :func:`run_audit`.

    ``features[name].ids`` must equal the record ids (same order). Folds come from ``group_id`` (or the
    sample id when absent) and are shared by all models; so are the bootstrap resamples.
    """
    cfg = cfg or AuditConfig()
    cfg.validate()
    if not features:
        raise ValueError("features: expected at least one model")
    ids = [str(r["id"]) for r in records]
    for name, fs in features.items():
        if list(fs.ids) != ids:
            raise ValueError(f"features[{name!r}].ids do not match the records (order or content)")
    groups = [str(r.get("group_id") or r["id"]) for r in records]
    folds_all = grouped_folds(groups, cfg.probe.folds, cfg.probe.seed)
    result: dict = {
        "version": AUDIT_VERSION,
        "config": {"attributes": cfg.attributes, "features": asdict(cfg.features), "probe": asdict(cfg.probe),
                   "min_per_class": cfg.min_per_class},
        "n_samples": len(ids),
        "n_groups": len(set(groups)),
        "folds": {"n": cfg.probe.folds, "unit": "group_id", "sizes": np.bincount(folds_all).tolist()},
        "attributes": {},
        "models": {},
        "skipped": [],
    }
    labelled = {}
    for a in cfg.attributes:
        lab = _attribute_labels(records, a, vocabs, cfg.min_per_class)
        if lab is None:
            result["skipped"].append({"attribute": a, "reason": "fewer than 2 classes with enough labelled samples"})
            continue
        idx, y, classes = lab
        labelled[a] = lab
        if len(set(folds_all[idx].tolist())) < 2:
            raise FairllavaError(f"attribute {a}: labelled samples fall in a single fold; lower --folds")
        counts = np.bincount(y, minlength=len(classes))
        share = counts[counts > 0] / counts.sum()
        result["attributes"][a] = {"classes": classes, "n": int(len(idx)), "class_counts": counts.tolist(),
                                   "chance_balanced_accuracy": 1.0 / len(classes),
                                   "entropy": float(-(share * np.log(share)).sum())}
    from .features import progress_bar

    total = sum(len(fs.layers) for fs in features.values()) * len(labelled)
    with progress_bar(progress) as bar:
        job = bar.add_task("fitting probes", total=total)
        for name, fs in features.items():
            per_model: dict = {"layers": list(fs.layers), "attributes": {}}
            for a, (idx, y, classes) in labelled.items():
                rows = []
                for layer in fs.layers:
                    X = fs.X[layer][idx]
                    logp = fit_probe(X, y, folds_all[idx], len(classes), cfg.probe)
                    res = score_probe(logp, y, [groups[i] for i in idx], len(classes), cfg.probe, key=(a, layer))
                    rows.append({"layer": int(layer), **res})
                    bar.advance(job)
                best = max(rows, key=lambda r: r["balanced_accuracy"])
                per_model["attributes"][a] = {"per_layer": rows, "max_balanced_accuracy": best["balanced_accuracy"],
                                              "argmax_layer": best["layer"]}
            result["models"][name] = per_model
    return result


def plot_leakage(result: dict, path: str | os.PathLike, metric: str = "balanced_accuracy") -> None:
    """One panel per attribute: leakage vs layer, one line (with CI band) per model, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = list(result["attributes"])
    if not attrs:
        raise FairllavaError("audit: no attribute could be probed; nothing to plot")
    fig, axes = plt.subplots(1, len(attrs), figsize=(4.2 * len(attrs), 3.4), squeeze=False)
    for ax, a in zip(axes[0], attrs):
        for name, m in result["models"].items():
            rows = m["attributes"][a]["per_layer"]
            xs = [r["layer"] for r in rows]
            ys = [100 * r[metric] for r in rows]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=name)
            cis = [r["ci"][metric] if r.get("ci") and r["ci"].get(metric) else None for r in rows]
            if all(c is not None for c in cis):
                ax.fill_between(xs, [100 * c[0] for c in cis], [100 * c[1] for c in cis], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        chance = 100 * (result["attributes"][a]["chance_balanced_accuracy"] if metric == "balanced_accuracy" else 0.5)
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_title(a)
        ax.set_xlabel("hidden-state index")
        ax.set_ylabel("probe balanced accuracy (%)" if metric == "balanced_accuracy" else "probe macro AUC (%)")
        ax.set_ylim(min(chance - 10, ax.get_ylim()[0]), 101)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def _fmt_ci(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "—"


def _info(row: dict) -> str:
    """The held-out information bound of a per-layer row (older audit.json files: clipped from mi_lower)."""
    v = row.get("info_lower_bound")
    if v is None and row.get("mi_lower") is not None:
        v = max(0.0, row["mi_lower"])
    return "—" if v is None else f"{v:.3f}"


def audit_markdown(result: dict, plot_name: str | None = "leakage.png") -> str:
    """A short report: per attribute, each model's peak leakage and a per-layer table."""
    cfg = result["config"]
    lines = ["# Leakage audit", "",
             f"{result['n_samples']} samples, {result['n_groups']} groups, {cfg['probe']['folds']} patient-level "
             f"folds (seed {cfg['probe']['seed']}); pooling `{cfg['features']['pooling']}` over "
             f"`{cfg['features']['tokens']}` tokens; probe: standardised logistic regression (C={cfg['probe']['C']}); "
             f"CIs: {cfg['probe']['n_boot']} patient-level bootstrap resamples. Information: the held-out "
             "cross-entropy bound I(a; z) >= H(a) - CE_heldout in nats, clipped to [0, H(a)] (H(a) = the most "
             "information the attribute can carry, shown per attribute); the CLUB figure in audit.json "
             "(`club_upper_bound`) is a variational upper bound, valid only when the probe fits.", ""]
    if plot_name:
        lines += [f"![leakage vs layer]({plot_name})", ""]
    for a, info in result["attributes"].items():
        lines += [f"## {a}", "", f"classes {info['classes']} (n = {info['n']}); chance balanced accuracy "
                  f"{100 * info['chance_balanced_accuracy']:.1f}; H(a) = {info.get('entropy', float('nan')):.3f} nats",
                  "",
                  "| model | peak balanced acc. | at layer | 95% CI |", "|---|---|---|---|"]
        for name, m in result["models"].items():
            s = m["attributes"][a]
            row = next(r for r in s["per_layer"] if r["layer"] == s["argmax_layer"])
            lines.append(f"| {name} | {100 * s['max_balanced_accuracy']:.1f} | {s['argmax_layer']} | "
                         f"{_fmt_ci((row.get('ci') or {}).get('balanced_accuracy'))} |")
        lines += ["", "| layer | " + " | ".join(f"{n}: bal. acc. / AUC / I >= H(a) - CE (nats)" for n in result["models"])
                  + " |",
                  "|---|" + "---|" * len(result["models"])]
        layers = result["models"][next(iter(result["models"]))]["layers"]
        for li, layer in enumerate(layers):
            cells = []
            for m in result["models"].values():
                r = m["attributes"][a]["per_layer"][li]
                cells.append(f"{100 * r['balanced_accuracy']:.1f} {_fmt_ci((r.get('ci') or {}).get('balanced_accuracy'))}"
                             f" / {100 * r['auc']:.1f} / {_info(r)}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    for s in result.get("skipped", []):
        lines.append(f"- skipped `{s['attribute']}`: {s['reason']}")
    return "\n".join(lines).rstrip() + "\n"


def write_audit(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """audit.json + leakage.png (+ leakage_auc.png) + audit.md, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "audit.json", "plot": out / "leakage.png", "plot_auc": out / "leakage_auc.png",
             "markdown": out / "audit.md"}
    atomic_write_json(paths["json"], result)
    plot_leakage(result, paths["plot"], "balanced_accuracy")
    plot_leakage(result, paths["plot_auc"], "auc")
    atomic_write_text(paths["markdown"], audit_markdown(result, paths["plot"].name))
    return paths


def run_audit(models: Mapping[str, tuple | Callable[[], tuple]], records: Sequence[dict],
              image_root: str | os.PathLike | None, out_dir: str | os.PathLike, cfg: AuditConfig | None = None, *,
              vocabs: Mapping | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Audit each ``name -> (model, processor)`` (plain HF or PEFT-wrapped) on ``records``.

    A value may also be a zero-argument loader returning ``(model, processor)``: the model is then
    loaded, streamed and released before the next one, so several large models never share memory.
    Pooled features are cached per model under ``out_dir/features/<name>/`` (resumable, reused by a
    rerun), then probed with :func:`audit_features`; audit.json, leakage plots and audit.md are written
    to ``out_dir`` (an existing audit.json needs ``overwrite``).
    """
    cfg = cfg or AuditConfig()
    cfg.validate()
    if not models:
        raise ValueError("models: expected at least one name -> (model, processor)")
    if not records:
        raise FairllavaError("audit data: no records")
    out = Path(out_dir)
    if (out / "audit.json").exists() and not overwrite:
        raise FairllavaError(f"{out / 'audit.json'}: already exists (pass --overwrite to replace it)")
    feats = {}
    for name, entry in models.items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        model, processor = entry() if callable(entry) else entry
        feats[name] = extract_features(model, processor, records, image_root, out / "features" / safe,
                                       cfg.features, vocabs=vocabs, progress=progress, label=name)
        if callable(entry):
            del model, processor
            gc.collect()
    result = audit_features(feats, records, cfg, vocabs=vocabs, progress=progress)
    write_audit(result, out)
    return result
