"""Write an evaluation folder (EVALUATION §5.7) or a combined multi-system comparison report.

Everything is built in a temp folder and renamed into place (``fairllava.io.atomic_dir``), so a folder
either holds a complete evaluation or does not exist; an existing folder is only replaced with
``overwrite=True``. No report text is written anywhere: per-sample rows carry ids, attributes and scores.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from ..io import atomic_dir
from .document import Figure, Heading, Para, Table, fmt_ci, fmt_p
from .html import render_html
from .inference import (all_equal_rows, comparison_lead, endpoint_blocks, evaluation_lead, mcnemar_blocks,
                        pooled_blocks, pooled_lead, signed_blocks)
from .markdown import render_markdown

PRIMARY = ("bleu1", "bleu4", "rouge_l", "meteor", "cider", "keyword_f1_micro_14", "radgraph_f1", "green",
           "chexbert_f1_micro_14", "accuracy", "macro_f1", "balanced_accuracy")


def _primary(metrics: Sequence[str], k: int = 6) -> list[str]:
    first = [m for m in PRIMARY if m in metrics]
    return (first + [m for m in metrics if m not in first])[:k]


def _csv(header: Sequence[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def _ci(ci, i):
    return None if not ci else ci[i]


def metrics_by_group_rows(r) -> list[list]:
    rows = []
    for m in r.metrics:
        ci = r.ci["overall"].get(m)
        rows.append(["overall", "all", r.n, m, r.overall[m], _ci(ci, 0), _ci(ci, 1)])
    for a in r.attributes:
        for g, vals in r.groups[a].items():
            for m in r.metrics:
                ci = r.ci["groups"][a][g].get(m)
                rows.append([a, g, vals["n"], m, vals.get(m), _ci(ci, 0), _ci(ci, 1)])
    return rows


FAIRNESS_HEADER = ["attribute", "metric", "overall", "gap", "gap_ci_l", "gap_ci_h", "es", "es_ci_l", "es_ci_h",
                   "es_variant", "n_groups", "excluded_groups"]


def fairness_rows(r) -> list[list]:
    es_key = "es" if r.es_variant == "maxmin" else "es_fairclip"
    rows = []
    for a in r.attributes:
        n_groups = len(r.groups[a]) - len(r.excluded[a])
        excl = ";".join(f"{g}(n={n})" for g, n in r.excluded[a].items())
        for m in r.metrics:
            gci, eci = r.ci["gap"][a].get(m), r.ci[es_key][a].get(m)
            rows.append([a, m, r.overall[m], r.gap[a][m], _ci(gci, 0), _ci(gci, 1), r.es_reported[a][m],
                         _ci(eci, 0), _ci(eci, 1), r.es_variant, n_groups, excl])
    return rows


def pvalue_rows(pvalues: list[dict]) -> tuple[list[str], list[list]]:
    """Header = the union of the rows' keys (first-seen order); CI lists become ``*_l``/``*_h`` columns."""
    if not pvalues:
        return ["attribute", "metric", "quantity", "p_one_sided", "p_two_sided", "p_holm"], []
    header: list[str] = []
    flat = []
    for p in pvalues:
        row = {}
        for k, v in p.items():
            if isinstance(v, (list, tuple)) and len(v) == 2 and (k == "ci" or k.endswith("_ci")):
                row[f"{k}_l"], row[f"{k}_h"] = v
            elif isinstance(v, (list, tuple, dict)):
                continue
            else:
                row[k] = v
            for key in ([f"{k}_l", f"{k}_h"] if f"{k}_l" in row else [k] if k in row else []):
                if key not in header:
                    header.append(key)
        flat.append(row)
    return header, [[r.get(k) for k in header] for r in flat]


def _definitions(r) -> str:
    es = "M_all / (1 + gap)" if r.es_variant == "maxmin" else "M_all / (1 + Σ_g |M_g − M_all|) (FairCLIP form)"
    return (f"All values in percent. Gap = max − min over groups with n ≥ {r.meta['n_min']}; ES = {es}, M_all = the "
            f"score on all {r.n} samples. 95% percentile bootstrap CIs from {r.meta['n_resamples']} "
            f"{r.meta['bootstrap']} resamples (seed {r.meta['seed']}); resampling unit: "
            f"{r.meta.get('resampling', 'iid')}. Corpus metrics (BLEU, F1) are recomputed on "
            "each group; per-sample metrics are averaged. Missing attribute values are excluded from that "
            "attribute's groups but counted overall. The max − min gap is never negative, so its CI is biased "
            "upward near 0 and almost never contains 0 even when all groups are equal: use the signed gaps and "
            "the \"all groups equal\" permutation p-values (Holm-adjusted over the attribute × metric cells) for "
            "inference.")


def evaluation_blocks(r, title: str = "Fairness evaluation", figures: bool = True) -> list:
    blocks: list = [Heading(title, 1), *evaluation_lead(r), *signed_blocks(r),
                    Heading("Data and definitions"),
                    Para(f"Task: {r.task}; {r.n} samples; source {r.meta.get('source')}; "
                         f"data hash {r.meta.get('data_hash', '')[:12]}."), Para(_definitions(r))]
    if r.skipped:
        blocks.append(Para("Skipped metrics: " + "; ".join(f"{m}: {why}" for m, why in r.skipped.items())))
    if any(m.startswith("keyword_f1") for m in r.metrics):
        blocks.append(Para("keyword_f1_* come from an offline rule-based CheXpert-style labeler (keywords + negation); "
                           "they approximate, and are not, CheXbert F1."))
    blocks += [Heading("Overall"), Table(["metric", "value [95% CI]"],
                                         [[m, fmt_ci(r.overall[m], r.ci["overall"].get(m))] for m in r.metrics])]
    es_key = "es" if r.es_variant == "maxmin" else "es_fairclip"
    p_eq, p_eq_holm = all_equal_rows(r)
    for a in r.attributes:
        blocks.append(Heading(f"Attribute: {a}"))
        if r.excluded[a]:
            blocks.append(Para(f"Excluded from gap/ES (n < {r.meta['n_min']}): " +
                               ", ".join(f"{g} (n={n})" for g, n in r.excluded[a].items())))
        if r.n_missing[a]:
            blocks.append(Para(f"{r.n_missing[a]} samples have no value for {a} (counted only overall)."))
        groups = list(r.groups[a])
        blocks.append(Table(["metric"] + [f"{g} (n={r.groups[a][g]['n']})" for g in groups],
                            [[m] + [fmt_ci(r.groups[a][g].get(m), r.ci["groups"][a][g].get(m)) for g in groups]
                             for m in r.metrics]))
        rows = []
        for m in r.metrics:
            w = r.worst[a][m]
            rows.append([m, fmt_ci(r.gap[a][m], r.ci["gap"][a].get(m)), fmt_ci(r.es_reported[a][m], r.ci[es_key][a].get(m)),
                         "–" if not w else f"{w['group']} ({w['value']:.2f})", fmt_ci(r.std[a][m], None),
                         fmt_p(p_eq.get((a, m))), fmt_p(p_eq_holm.get((a, m)))])
        blocks.append(Table(["metric", "gap [95% CI]", f"ES ({r.es_variant}) [95% CI]", "worst group", "std of groups",
                             "p all groups equal", "p Holm"], rows))
        if figures:
            blocks.append(Figure(f"{a}: per-group scores", _fig_group(r, a)))
            blocks.append(Figure(f"{a}: gap and ES", _fig_gap([r], a)))
    if r.stratified:
        blocks.append(Heading("Stratified (cross-sectional) gaps"))
        blocks.append(Table(["target", "metric", "strata by", "aggregate gap", "strata used", "strata skipped"],
                            [[s["target"], s["metric"], "&".join(s["strata_by"]), fmt_ci(s["gap"], None),
                              len(s["strata"]), len(s["skipped"])] for s in r.stratified]))
    return blocks


def _fig_group(r, a):
    from .figures import group_bars

    return group_bars(r, a, _primary(r.metrics))


def _fig_gap(results, a, names=None):
    from .figures import gap_es_bars

    names = names or [f"system {i}" for i in range(len(results))]
    return gap_es_bars(dict(zip(names, results)), a, _primary(results[0].metrics))


def audit_blocks(audit: dict) -> list:
    """The leakage-audit section (issue: an evaluation report shows it when an audit exists)."""
    import tempfile

    from ..audit.audit import _info, plot_leakage

    cfg = audit["config"]
    blocks: list = [Heading("Leakage audit (linear probes on pooled hidden states)"),
                    Para(f"{audit['n_samples']} samples, {cfg['probe']['folds']} patient-level folds; pooling "
                         f"{cfg['features']['pooling']} over {cfg['features']['tokens']} tokens; balanced accuracy of a "
                         "fresh linear probe per layer (chance dashed), 95% bootstrap CIs. Lower = less demographic "
                         "information left in the representation. Information: held-out cross-entropy bound "
                         "I(a; z) ≥ H(a) − CE_heldout in nats, clipped to [0, H(a)]; CLUB is a variational upper "
                         "bound, valid only when the probe fits (it can exceed H(a)).")]
    for a, info in audit["attributes"].items():
        rows = []
        for name, m in audit["models"].items():
            st = m["attributes"][a]
            for r in st["per_layer"]:
                ci = (r.get("ci") or {}).get("balanced_accuracy")
                rows.append([name, r["layer"], fmt_ci(100 * r["balanced_accuracy"],
                                                      [100 * ci[0], 100 * ci[1]] if ci else None),
                             _info(r), f"{r.get('club_upper_bound', r['mi']):.3f}"])
        h = info.get("entropy")
        blocks += [Heading(f"Leakage: {a} (chance {100 * info['chance_balanced_accuracy']:.1f}"
                           f"{'' if h is None else f'; H(a) = {h:.3f} nats'})", 3),
                   Table(["model", "hidden-state index", "probe balanced acc.", "I ≥ H(a) − CE (nats)",
                          "CLUB (variational upper bound)"], rows)]
    with tempfile.TemporaryDirectory() as d:
        plot_leakage(audit, Path(d) / "leakage.png")
        blocks.append(Figure("leakage vs layer", (Path(d) / "leakage.png").read_bytes()))
    return blocks


def _write_files(r, folder: Path, title: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)  # inside an atomic_dir (which sets the usual permissions)
    (folder / "metrics.json").write_text(json.dumps(r.to_dict(), indent=2) + "\n", encoding="utf-8")
    with open(folder / "scores_per_sample.jsonl", "w", encoding="utf-8") as f:
        for row in r.per_sample:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "metrics_by_group.csv").write_text(
        _csv(["attribute", "group", "n", "metric", "value", "ci_l", "ci_h"], metrics_by_group_rows(r)), encoding="utf-8")
    (folder / "fairness.csv").write_text(_csv(FAIRNESS_HEADER, fairness_rows(r)), encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps(r.meta, indent=2) + "\n", encoding="utf-8")
    blocks = evaluation_blocks(r, title)
    (folder / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (folder / "report.html").write_text(render_html(blocks, title), encoding="utf-8")


def write_evaluation(result, out_dir, overwrite: bool = False, title: str = "Fairness evaluation") -> Path:
    """Write ``metrics.json, scores_per_sample.jsonl, metrics_by_group.csv, fairness.csv, meta.json, report.md,
    report.html`` into ``out_dir`` atomically; refuses an existing folder unless ``overwrite``."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_files(result, tmp, title)
    return out


def comparison_blocks(results: dict, pvalues: list[dict], meta: dict | None = None, endpoints: list[dict] | None = None,
                      mcnemar: dict | None = None) -> list:
    names = list(results)
    first = results[names[0]]
    blocks: list = [Heading("Fairness comparison: " + " vs ".join(names), 1),
                    *comparison_lead(endpoints or [], names, (meta or {}).get("primary", [])),
                    *endpoint_blocks(endpoints or [], names), *mcnemar_blocks(mcnemar or {}, names),
                    Heading("Data and definitions"), Para(_definitions(first))]
    if meta:
        blocks.append(Para(f"Compared on {meta.get('n_shared', first.n)} shared ids "
                           f"({meta.get('n_only_first', 0)} only in {names[0]}, {meta.get('n_only_second', 0)} only in "
                           f"{names[-1]}). {meta.get('test', '')}"))
    blocks += [Heading("Overall"), Table(["metric"] + names, [[m] + [fmt_ci(r.overall.get(m), r.ci["overall"].get(m))
                                                                   for r in results.values()] for m in first.metrics])]
    for a in first.attributes:
        blocks.append(Heading(f"Attribute: {a}"))
        rows = []
        for m in first.metrics:
            row = [m]
            for r in results.values():
                es_key = "es" if r.es_variant == "maxmin" else "es_fairclip"
                row += [fmt_ci(r.gap.get(a, {}).get(m), r.ci["gap"].get(a, {}).get(m)),
                        fmt_ci(r.es_reported.get(a, {}).get(m), r.ci[es_key].get(a, {}).get(m))]
            rows.append(row)
        blocks.append(Table(["metric"] + [f"{n} {q}" for n in names for q in ("gap", "ES")], rows))
        blocks.append(Figure(f"{a}: gap and ES by system", _fig_gap(list(results.values()), a, names)))
        for n, r in results.items():
            blocks.append(Figure(f"{a}: per-group scores, {n}", _fig_group(r, a)))
    if pvalues:
        blocks.append(Heading("Paired bootstrap p-values"))
        blocks.append(Para("Max − min gap and ES (exploratory; the paired bootstrap on max − min has little power). "
                           "p_holm: Holm over this table."))
        header, rows = pvalue_rows(pvalues)
        blocks.append(Table(header, [[fmt_p(v) if k.startswith("p_") else v for k, v in zip(header, row)] for row in rows]))
    return blocks


def write_comparison_report(results: dict, pvalues: list[dict], out_dir, overwrite: bool = False,
                            meta: dict | None = None, per_system: bool = True, audit: dict | None = None,
                            endpoints: list[dict] | None = None, mcnemar: dict | None = None) -> Path:
    """One folder for several systems: ``report.md``, ``report.html``, ``pvalues.csv``, ``fairness.csv`` (with a
    ``system`` column), ``metrics.json`` and ``meta.json`` keyed by system; plus each system's full evaluation
    folder under ``<name>/`` when ``per_system``. ``endpoints``/``mcnemar`` (from
    :class:`~fairllava.fairness.compare.ComparisonResult`) lead the report and head ``pvalues.csv``; they are
    also written to ``endpoints.json``."""
    if not results:
        raise ValueError("results must name at least one system")
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if per_system:
            for name, r in results.items():
                _write_files(r, tmp / _safe(name), f"Fairness evaluation: {name}")
        header, rows = pvalue_rows(list(endpoints or []) + list(pvalues))
        (tmp / "pvalues.csv").write_text(_csv(header, rows), encoding="utf-8")
        if endpoints or mcnemar:
            (tmp / "endpoints.json").write_text(json.dumps({"primary": (meta or {}).get("primary", []),
                                                            "endpoints": endpoints or [], "mcnemar": mcnemar or {}},
                                                           indent=2) + "\n", encoding="utf-8")
        (tmp / "fairness.csv").write_text(_csv(["system"] + FAIRNESS_HEADER,
                                               [[n] + row for n, r in results.items() for row in fairness_rows(r)]),
                                          encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps({n: r.to_dict() for n, r in results.items()}, indent=2) + "\n",
                                          encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps({"comparison": meta or {}, "systems": {n: r.meta for n, r in results.items()}},
                                                  indent=2) + "\n", encoding="utf-8")
        blocks = comparison_blocks(results, pvalues, meta, endpoints, mcnemar)
        if audit is not None:
            blocks += audit_blocks(audit)
            (tmp / "audit.json").write_text(json.dumps(audit, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(blocks, "Fairness comparison"), encoding="utf-8")
    return out


def write_pooled_report(pooled: list[dict], out_dir, names: tuple[str, str] = ("baseline", "method"),
                        meta: dict | None = None, overwrite: bool = False) -> Path:
    """Several seeds' (baseline, method) pairs: the pooled verdict first, then the per-seed tables.

    Writes ``report.md``, ``report.html``, ``pooled.json`` (every endpoint's per-seed rows and pooled estimate),
    ``per_seed.csv``, ``pvalues.csv`` (pooled rows, Holm over the primary family) and ``meta.json``."""
    out = Path(out_dir)
    names = tuple(names)
    blocks: list = [Heading("Fairness comparison over seeds: " + " vs ".join(names), 1), *pooled_lead(pooled, names),
                    *pooled_blocks(pooled, names)]
    per_seed = [[f"{p['attribute']}:{p['metric']}", r["seed"], r.get("baseline_file"), r.get("method_file"),
                 r["baseline"], r["method"], r["diff"], _ci(r["ci"], 0), _ci(r["ci"], 1), r["p_value"]]
                for p in pooled for r in p["per_seed"]]
    prow = [{"endpoint": f"{p['attribute']}:{p['metric']}", "family": "primary", "direction":
             f"{p['attribute']}={p['advantaged']}>{p['disadvantaged']}", "n_seeds": p["pooled"]["n_seeds"],
             "diff": p["pooled"]["diff"], "ci": p["pooled"]["ci"], "p_value": p["pooled"]["p_value"],
             "p_two_sided": p["pooled"]["p_two_sided"], "p_holm": p["pooled"].get("p_holm")} for p in pooled]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "pooled.json").write_text(json.dumps({"names": list(names), "endpoints": pooled}, indent=2) + "\n",
                                         encoding="utf-8")
        (tmp / "per_seed.csv").write_text(_csv(["endpoint", "pair", "baseline_file", "method_file", "baseline", "method",
                                                "diff", "ci_l", "ci_h", "p_value"], per_seed), encoding="utf-8")
        header, rows = pvalue_rows(prow)
        (tmp / "pvalues.csv").write_text(_csv(header, rows), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(blocks, "Fairness comparison over seeds"), encoding="utf-8")
    return out


def _safe(name: str) -> str:
    import re

    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not s:
        raise ValueError(f"system name {name!r} is not usable as a folder name")
    return s
