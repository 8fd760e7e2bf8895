"""Report blocks for the inference statistics: the verdict that opens a report, signed gaps, paired endpoints,
McNemar tables and pooled seeds. Why a separate module: writer.py lays out folders; this says what was found.

Every verdict sentence is computed from the numbers (never typed): the primary endpoint, its CI, its p-value
and its Holm-adjusted p-value over the declared primary family.
"""
from __future__ import annotations

from typing import Sequence

from ..fairness.compare import holm
from ..fairness.signed import KEY_METRIC
from .document import Heading, Para, Table, fmt_ci, fmt_p

ALPHA = 0.05


def _dir(cell_or_row: dict, attribute: str) -> str:
    return f"{attribute}: {cell_or_row['advantaged']} > {cell_or_row['disadvantaged']}"


def primary_signed(r) -> tuple[str, str, dict] | None:
    """(attribute, metric, cell) of a single evaluation's primary endpoint: first direction x key metric."""
    if not r.signed_gap:
        return None
    attr = next(iter(r.signed_gap))
    cells = r.signed_gap[attr]
    key = KEY_METRIC.get(r.task)
    metric = key if key in cells else next(iter(cells))
    return attr, metric, cells[metric]


def evaluation_lead(r) -> list:
    """The first lines of an evaluation report: the primary signed gap, or why there is none."""
    p = primary_signed(r)
    if p is None:
        return [Para("**Verdict:** no direction was given (--direction, --datacard or --direction-from), so no "
                     "signed gap was tested. The max−min gaps below are point summaries: their bootstrap CIs are "
                     "biased upward near 0 and cannot show equality; see the \"all groups equal\" permutation p.")]
    attr, metric, c = p
    where = "worse" if (c["value"] or 0) > 0 else "not worse"
    sig = c["p_value"] is not None and c["p_value"] < ALPHA
    return [Para(f"**Primary endpoint:** signed gap of {metric}, {_dir(c, attr)} (> 0: {c['disadvantaged']} worse "
                 f"off) = {fmt_ci(c['value'], c['ci'])} (95% {c['ci_method']} CI), permutation p = "
                 f"{fmt_p(c['p_value'])} (two-sided; one-sided {fmt_p(c['p_one_sided'])}); "
                 f"{c['n_advantaged']} vs {c['n_disadvantaged']} samples, {c['resampling']} resampling. "
                 f"Direction from {c['direction_source']}."),
            Para(f"**Verdict:** {c['disadvantaged']} is {where} off on {metric}"
                 f"{' (significant at α = 0.05)' if sig else ' (not significant at α = 0.05)'}.")]


def signed_blocks(r) -> list:
    """All signed gaps of an evaluation, with Holm-adjusted p-values over the table."""
    if not r.signed_gap:
        return []
    rows = [(a, m, c) for a, cells in r.signed_gap.items() for m, c in cells.items()]
    adj = holm([c["p_value"] for _, _, c in rows])
    return [Heading("Signed gaps (direction fixed in advance)"),
            Para("Δs = M(advantaged) − M(disadvantaged) (reversed for lower-is-better rates, so > 0 means the "
                 "disadvantaged group is worse off). CI: bootstrap stratified by group over units (whole group_id "
                 "clusters when present); p: permutation of group labels among units within task-label strata. "
                 "Holm over this table."),
            Table(["attribute", "metric", "advantaged > disadvantaged", "Δs [95% CI]", "p (two-sided)",
                   "p one-sided", "p Holm"],
                  [[a, m, f"{c['advantaged']} > {c['disadvantaged']}", fmt_ci(c["value"], c["ci"]),
                    fmt_p(c["p_value"]), fmt_p(c["p_one_sided"]), fmt_p(h)] for (a, m, c), h in zip(rows, adj)])]


def all_equal_rows(r) -> tuple[dict, dict]:
    """p for "all groups equal" per (attribute, metric) and its Holm adjustment over every cell."""
    keys = [(a, m) for a in r.p_all_equal for m in r.p_all_equal[a]]
    adj = holm([r.p_all_equal[a][m] for a, m in keys])
    return ({k: r.p_all_equal[k[0]][k[1]] for k in keys}, dict(zip(keys, adj)))


def comparison_lead(endpoints: Sequence[dict], names: Sequence[str], primary: Sequence[str]) -> list:
    """The verdict of a paired comparison: each primary endpoint with CI, p and Holm p (family = primary)."""
    base, meth = names[0], names[-1]
    prim = [e for e in endpoints if e["family"] == "primary"]
    if not prim:
        return [Para("**Verdict:** no direction was given, so no primary endpoint was tested; the max−min gap "
                     "comparison below is exploratory (its bootstrap p-values have little power).")]
    out = []
    for e in prim:
        out.append(Para(
            f"**Primary endpoint {e['endpoint']}** (signed gap, {e['direction']}; > 0: {e['direction'].split('>')[-1]}"
            f" worse off): {base} {fmt_ci(e[base], e[f'{base}_ci'])} → {meth} {fmt_ci(e[meth], e[f'{meth}_ci'])}; "
            f"reduction {fmt_ci(e['diff'], e['ci'])} (95% {e['ci_method']} CI), paired permutation p = "
            f"{fmt_p(e['p_value'])} (one-sided), Holm p = {fmt_p(e.get('p_holm'))} over {len(prim)} primary "
            f"endpoint(s)."))
    won = [e["endpoint"] for e in prim if e.get("p_holm") is not None and e["p_holm"] < ALPHA and e["diff"] > 0]
    if won:
        out.append(Para(f"**Verdict:** {meth} narrowed the gap on {', '.join(won)} (Holm p < 0.05)."))
    else:
        out.append(Para(f"**Verdict:** {meth} did not significantly narrow the gap on the primary endpoint(s) "
                        "(Holm p ≥ 0.05)."))
    out.append(Para(f"Primary family (declared before the analysis): {', '.join(primary)}. Direction source: "
                    f"{prim[0]['direction_source']}."))
    return out


def endpoint_blocks(endpoints: Sequence[dict], names: Sequence[str]) -> list:
    if not endpoints:
        return []
    base, meth = names[0], names[-1]
    return [Heading("Signed-gap differences (paired)"),
            Para(f"d = Δs({base}) − Δs({meth}) (> 0: {meth} has the smaller signed gap). Paired bootstrap CI (same "
                 "unit draws for both systems); p: paired permutation (each unit's outputs swapped between the "
                 "systems), one-sided. Holm within each family; secondary endpoints are exploratory."),
            Table(["family", "endpoint", "direction", f"{base} Δs [95% CI]", f"{meth} Δs [95% CI]", "d [95% CI]",
                   "p (one-sided)", "p two-sided", "p Holm"],
                  [[e["family"], e["endpoint"], e["direction"], fmt_ci(e[base], e[f"{base}_ci"]),
                    fmt_ci(e[meth], e[f"{meth}_ci"]), fmt_ci(e["diff"], e["ci"]), fmt_p(e["p_value"]),
                    fmt_p(e["p_two_sided"]), fmt_p(e.get("p_holm"))] for e in endpoints])]


def mcnemar_blocks(mcnemar: dict, names: Sequence[str]) -> list:
    if not mcnemar:
        return []
    base, meth = names[0], names[-1]
    rows, raw = [], []
    for attr, per_metric in mcnemar.items():
        for m, groups in per_metric.items():
            for g, t in groups.items():
                raw.append(t["p_value"])
                rows.append([attr, m, g, t["n"], fmt_ci(t["rate_baseline"], None), fmt_ci(t["rate_method"], None),
                             t["only_baseline"], t["only_method"], fmt_p(t["p_value"])])
    for row, h in zip(rows, holm(raw)):
        row.append(fmt_p(h))
    return [Heading("Exact McNemar tests per group"),
            Para(f"accuracy: per-sample correctness (H1: {meth} right more often); fpr_<LABEL>: false positives among "
                 f"samples whose true label is another one (H1: {meth} fewer). Samples are treated as independent."),
            Table(["attribute", "metric", "group", "n", f"{base} %", f"{meth} %", f"only {base}", f"only {meth}",
                   "p (one-sided)", "p Holm"], rows)]


def pooled_lead(pooled: Sequence[dict], names: Sequence[str]) -> list:
    base, meth = names[0], names[-1]
    adj = holm([p["pooled"]["p_value"] for p in pooled])
    out = []
    for p, h in zip(pooled, adj):
        q = p["pooled"]
        out.append(Para(
            f"**Primary endpoint {p['attribute']}:{p['metric']}** (signed gap, {p['advantaged']} > "
            f"{p['disadvantaged']}), pooled over {q['n_seeds']} seeds: mean reduction Δs({base}) − Δs({meth}) = "
            f"{fmt_ci(q['diff'], q['ci'])} (95% random-effects CI), one-sided p = {fmt_p(q['p_value'])}, Holm p = "
            f"{fmt_p(h)} over {len(pooled)} primary endpoint(s)."))
        p["pooled"]["p_holm"] = h
    won = [f"{p['attribute']}:{p['metric']}" for p in pooled
           if p["pooled"]["p_holm"] is not None and p["pooled"]["p_holm"] < ALPHA and p["pooled"]["diff"] > 0]
    out.append(Para(f"**Verdict:** {meth} narrowed the gap on {', '.join(won)} across seeds (Holm p < 0.05)." if won
                    else f"**Verdict:** {meth} did not significantly narrow the gap across seeds (Holm p ≥ 0.05)."))
    return out


def pooled_blocks(pooled: Sequence[dict], names: Sequence[str]) -> list:
    base, meth = names[0], names[-1]
    blocks: list = []
    for p in pooled:
        q = p["pooled"]
        df = "∞ (normal)" if q["df"] is None else f"{q['df']:.1f}"
        blocks += [Heading(f"{p['attribute']}:{p['metric']} per seed"),
                   Table(["pair", f"{base} file", f"{meth} file", "n", f"{base} Δs [95% CI]", f"{meth} Δs [95% CI]",
                          "d [95% CI]", "p (one-sided)"],
                         [[r["seed"], r.get("baseline_file", ""), r.get("method_file", ""), r.get("n_samples", ""),
                           fmt_ci(r["baseline"], r["baseline_ci"]), fmt_ci(r["method"], r["method_ci"]),
                           fmt_ci(r["diff"], r["ci"]), fmt_p(r["p_value"])] for r in p["per_seed"]]),
                   Para(f"Pooled: {fmt_ci(q['diff'], q['ci'])}; SE {q['se']:.3f}, between-seed variance τ² = "
                        f"{q['tau2']:.3f}, sampling variance of the mean {q['sampling_var']:.3f}, df "
                        f"{df}; "
                        f"{'one test set shared by all seeds' if q['shared_samples'] else 'seeds on different samples'}"
                        f"; resampling {p.get('resampling', '')}. {q['method']}.")]
    return blocks
