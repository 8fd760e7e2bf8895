"""CLI verbs ``evaluate`` and ``compare``: thin wrappers over fairllava.fairness and fairllava.report."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import FairllavaError
from ._app import app, console


class Task(str, Enum):
    report = "report"
    vqa = "vqa"


class ESVariant(str, Enum):
    maxmin = "maxmin"
    fairclip = "fairclip"


class Bootstrap(str, Enum):
    iid = "iid"
    stratified = "stratified"


class CIMethod(str, Enum):
    bca = "bca"
    percentile = "percentile"


def _split(s: Optional[str], what: str) -> Optional[list[str]]:
    if s is None:
        return None
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise FairllavaError(f"--{what}: expected a comma-separated list, got {s!r}")
    return items


def _scorers(clinical: Optional[str]) -> list:
    """Clinical adapters by name; weights come from FAIRLLAVA_{CHEXBERT,RADGRAPH,GREEN}_WEIGHTS."""
    from ..metrics.clinical import CheXbertLabeler, GreenScorer, RadGraphScorer

    makers = {"chexbert": CheXbertLabeler, "radgraph": RadGraphScorer, "green": GreenScorer}
    out = []
    for name in _split(clinical, "clinical") or []:
        if name not in makers:
            raise FairllavaError(f"--clinical: unknown scorer {name!r}; choose from {', '.join(makers)}")
        out.append(makers[name]())
    return out


def _common(task, attributes, n_min, n_boot, seed, es_variant, labels, metrics, bootstrap, intersections,
            stratified, clinical, rate=None, n_perm=1000, ci_method=CIMethod.bca, cluster=True) -> dict:
    if n_min < 1:
        raise FairllavaError(f"--n-min must be >= 1, got {n_min}")
    if n_boot < 0:
        raise FairllavaError(f"--n-boot must be >= 0, got {n_boot}")
    if n_perm < 0:
        raise FairllavaError(f"--n-perm must be >= 0, got {n_perm}")
    if labels is not None and task != Task.vqa:
        raise FairllavaError("--labels only applies to --task vqa")
    if rate and task != Task.vqa:
        raise FairllavaError(f"--rate {rate[0]}: false-positive rates need --task vqa (labelled answers)")
    return dict(attributes=_split(attributes, "attributes"), n_min=n_min, n_boot=n_boot, seed=seed,
                es_variant=es_variant.value, labels=_split(labels, "labels"), metrics=_split(metrics, "metrics"),
                bootstrap=bootstrap.value, intersections=intersections, stratified=stratified,
                scorers=_scorers(clinical), progress=True, rate_labels=list(rate or []), n_perm=n_perm,
                ci_method=ci_method.value, cluster="auto" if cluster else False)


def _directions(direction, datacard, direction_from, direction_metric, evaluated: list[Path], task: Task,
                kw: dict) -> list:
    """--direction (user) first, then --datacard, then --direction-from; the first per attribute wins."""
    from ..fairness.signed import directions_from_datacard, directions_from_file, parse_direction

    out = [parse_direction(d) for d in direction or []]
    attrs = [d.attribute for d in out]
    if len(set(attrs)) != len(attrs):
        dup = next(a for a in attrs if attrs.count(a) > 1)
        raise FairllavaError(f"--direction: attribute {dup!r} has more than one direction; give one per attribute")
    if datacard is not None:
        out += directions_from_datacard(datacard)
    if direction_from is not None:
        if not direction_from.is_file():
            raise FairllavaError(f"--direction-from {direction_from}: no such file")
        for f in evaluated:
            if Path(f).resolve() == direction_from.resolve():
                raise FairllavaError(f"--direction-from {direction_from}: is an evaluated file; the direction must "
                                     "come from other data (e.g. the validation predictions)")
        out += directions_from_file(direction_from, task.value, kw["attributes"], direction_metric, kw["n_min"],
                                    kw["labels"])
    seen, uniq = set(), []
    for d in out:
        if d.attribute not in seen:
            seen.add(d.attribute)
            uniq.append(d)
    if kw["attributes"]:
        uniq = [d for d in uniq if d.attribute in kw["attributes"] or d in out[:len(direction or [])]]
    return uniq


_ATTR = typer.Option(None, "--attributes", help="Comma-separated attributes (default: all present).")
_NMIN = typer.Option(20, "--n-min", help="Groups smaller than this are reported but excluded from gaps/ES.")
_NBOOT = typer.Option(1000, "--n-boot", help="Bootstrap resamples for 95% percentile CIs (0 = no CIs).")
_SEED = typer.Option(0, "--seed", help="Base seed of the bootstrap SeedSequence.")
_ES = typer.Option(ESVariant.maxmin, "--es-variant", help="ES = M_all/(1+gap) (maxmin) or the FairCLIP form.")
_LABELS = typer.Option(None, "--labels", help="VQA class codes, e.g. MEL,NV,VASC (default: the 7 HAM10000 classes).")
_METRICS = typer.Option(None, "--metrics", help="Comma-separated metrics (default: all for the task).")
_BOOT = typer.Option(Bootstrap.iid, "--bootstrap", help="iid resampling or stratified by the attribute's groups.")
_INTER = typer.Option(False, "--intersections", help="Also evaluate pairwise attribute intersections.")
_STRAT = typer.Option(False, "--stratified", help="Also compute cross-sectional (stratified) gaps.")
_CLIN = typer.Option(None, "--clinical", help="Clinical scorers: chexbert,radgraph,green (optional packages + weights).")
_OVER = typer.Option(False, "--overwrite", help="Replace an existing output folder.")
_DIR = typer.Option(None, "--direction", help="ATTR=ADVANTAGED>DISADVANTAGED fixed in advance, e.g. race=light>dark "
                                              "(repeatable): adds signed gaps with CI and permutation p.")
_CARD = typer.Option(None, "--datacard", help="Datacard JSON declaring directions (the shortcut benchmark's minority).")
_DFROM = typer.Option(None, "--direction-from", help="Another predictions file (e.g. validation): its worst group per "
                                                     "attribute is the disadvantaged one.")
_DMETRIC = typer.Option(None, "--direction-metric", help="Metric --direction-from reads (default: accuracy / bleu4).")
_RATE = typer.Option(None, "--rate", help="VQA label whose false-positive rate per group is reported and tested "
                                          "(repeatable), e.g. MEL.")
_NPERM = typer.Option(1000, "--n-perm", help="Permutations for the p-values (0 = none).")
_CIM = typer.Option(CIMethod.bca, "--ci-method", help="Signed-gap CI: bca (default) or percentile.")
_CLUSTER = typer.Option(True, "--cluster/--no-cluster", help="Resample whole group_id clusters when the predictions "
                                                             "carry them (default) or samples iid.")


@app.command()
def evaluate(
    predictions: Path = typer.Option(..., "--predictions", help="Predictions JSONL (id, prediction, reference, attributes[, label])."),
    task: Task = typer.Option(Task.report, "--task"),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    attributes: Optional[str] = _ATTR, n_min: int = _NMIN, n_boot: int = _NBOOT, seed: int = _SEED,
    es_variant: ESVariant = _ES, labels: Optional[str] = _LABELS, metrics: Optional[str] = _METRICS,
    bootstrap: Bootstrap = _BOOT, intersections: bool = _INTER, stratified: bool = _STRAT,
    clinical: Optional[str] = _CLIN, overwrite: bool = _OVER, direction: Optional[List[str]] = _DIR,
    datacard: Optional[Path] = _CARD, direction_from: Optional[Path] = _DFROM, direction_metric: Optional[str] = _DMETRIC,
    rate: Optional[List[str]] = _RATE, n_perm: int = _NPERM, ci_method: CIMethod = _CIM, cluster: bool = _CLUSTER,
) -> None:
    """Per-group metrics, gaps, equity-scaled scores and bootstrap CIs for one predictions file; with a direction,
    signed gaps with CI and permutation p (the report opens with the primary one)."""
    from ..fairness import evaluate_predictions
    from ..report import write_evaluation

    if out.exists() and not overwrite:
        raise FairllavaError(f"{out}: already exists (pass --overwrite to replace it)")
    kw = _common(task, attributes, n_min, n_boot, seed, es_variant, labels, metrics, bootstrap, intersections,
                 stratified, clinical, rate, n_perm, ci_method, cluster)
    kw["directions"] = _directions(direction, datacard, direction_from, direction_metric, [predictions], task, kw)
    result = evaluate_predictions(predictions, task.value, **kw)
    write_evaluation(result, out, overwrite=overwrite)
    console.print(f"evaluated {result.n} samples, {len(result.metrics)} metrics, {len(result.attributes)} attributes "
                  f"-> {out}", highlight=False)
    for m, why in result.skipped.items():
        console.print(f"[yellow]skipped {m}:[/yellow] {why}", highlight=False)


@app.command(context_settings={"ignore_unknown_options": True})
def compare(
    files: Optional[List[str]] = typer.Argument(None, help="BASELINE METHOD, or --pair BASELINE METHOD repeated "
                                                           "(one pair per training seed)."),
    task: Task = typer.Option(Task.report, "--task"),
    out: Path = typer.Option(..., "--out", help="Output folder for the combined report."),
    names: str = typer.Option("baseline,method", "--names", help="Display names of A and B."),
    holm: bool = typer.Option(False, "--holm", help="(Kept for compatibility: Holm-adjusted p-values are always shown.)"),
    strict_ids: bool = typer.Option(False, "--strict-ids", help="Fail unless both files have exactly the same ids "
                                                                "(always on with --pair)."),
    primary: Optional[List[str]] = typer.Option(None, "--primary", help="Primary endpoint ATTR:METRIC (repeatable; "
                                                "default: the first direction with accuracy / bleu4); Holm over them."),
    attributes: Optional[str] = _ATTR, n_min: int = _NMIN, n_boot: int = _NBOOT, seed: int = _SEED,
    es_variant: ESVariant = _ES, labels: Optional[str] = _LABELS, metrics: Optional[str] = _METRICS,
    bootstrap: Bootstrap = _BOOT, intersections: bool = _INTER, stratified: bool = _STRAT,
    clinical: Optional[str] = _CLIN, overwrite: bool = _OVER, direction: Optional[List[str]] = _DIR,
    datacard: Optional[Path] = _CARD, direction_from: Optional[Path] = _DFROM, direction_metric: Optional[str] = _DMETRIC,
    rate: Optional[List[str]] = _RATE, n_perm: int = _NPERM, ci_method: CIMethod = _CIM, cluster: bool = _CLUSTER,
) -> None:
    """Paired comparison of a baseline and a method: signed-gap differences (paired bootstrap CI, paired
    permutation p, Holm over the primary family), McNemar per group, and the paper's gap/ES tests. Several
    --pair options (one per seed) give a per-seed table and a pooled effect."""
    from ..fairness import compare as compare_fn
    from ..fairness.pooling import pair_paths
    from ..report import write_comparison_report

    if out.exists() and not overwrite:
        raise FairllavaError(f"{out}: already exists (pass --overwrite to replace it)")
    pairs = pair_paths(files or [])
    pair = _split(names, "names")
    if len(pair) != 2 or pair[0] == pair[1]:
        raise FairllavaError(f"--names: expected two different names like 'baseline,method', got {names!r}")
    if n_boot < 1:
        raise FairllavaError("--n-boot must be >= 1 for compare (p-values need resamples)")
    for f in (x for p in pairs for x in p):
        if not Path(f).is_file():
            raise FairllavaError(f"{f}: no such predictions file")
    kw = _common(task, attributes, n_min, n_boot, seed, es_variant, labels, metrics, bootstrap, intersections,
                 stratified, clinical, rate, n_perm, ci_method, cluster)
    kw["directions"] = _directions(direction, datacard, direction_from, direction_metric,
                                   [Path(x) for p in pairs for x in p], task, kw)
    if len(pairs) > 1 or "--pair" in (files or []):
        strict_ids = True
    if len(pairs) > 1:
        _compare_seeds(pairs, task, out, tuple(pair), primary, kw, overwrite)
        return
    baseline, method = pairs[0]
    res = compare_fn(baseline, method, task.value, names=tuple(pair), holm_correction=holm, strict_ids=strict_ids,
                     primary=primary, **kw)
    write_comparison_report(res.results, res.pvalues, out, overwrite=overwrite, meta=res.meta,
                            endpoints=res.endpoints, mcnemar=res.mcnemar)
    console.print(f"compared {res.meta['n_shared']} shared ids ({res.meta['n_only_first']} only in {pair[0]}, "
                  f"{res.meta['n_only_second']} only in {pair[1]}) -> {out}", highlight=False)
    for e in res.primary_endpoints():
        console.print(f"primary {e['endpoint']}: signed gap {pair[0]} {_num(e[pair[0]])} -> {pair[1]} "
                      f"{_num(e[pair[1]])}, reduction {_num(e['diff'])} {_ci(e['ci'])}, p = {_num(e['p_value'], 4)}, "
                      f"Holm p = {_num(e['p_holm'], 4)}", highlight=False)


def _num(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _compare_seeds(pairs, task: Task, out: Path, names: tuple[str, str], primary, kw: dict, overwrite: bool) -> None:
    """Several (baseline, method) pairs: pool every primary endpoint over the seeds (fairllava.fairness.pooling)."""
    from ..fairness.endpoints import default_primary
    from ..fairness.pooling import pool_seeds
    from ..fairness.signed import KEY_METRIC
    from ..report import write_pooled_report

    dirs = {d.attribute: d for d in kw["directions"]}
    if not dirs:
        raise FairllavaError("--pair (several seeds): pooling needs a direction (--direction, --datacard or "
                             "--direction-from)")
    metric_list = kw["metrics"] or [KEY_METRIC[task.value]]
    endpoints = list(primary or default_primary(kw["directions"], metric_list, task.value))
    pooled = []
    for e in endpoints:
        attr, _, metric = e.partition(":")
        if attr not in dirs or not metric:
            raise FairllavaError(f"--primary {e!r}: expected ATTR:METRIC with a direction for ATTR "
                                 f"(directions: {', '.join(dirs)})")
        rate = metric[len("fpr_"):] if metric.startswith("fpr_") else None
        pooled.append(pool_seeds(pairs, dirs[attr], task.value, metric=None if rate else metric, rate_label=rate,
                                 labels=kw["labels"], n_boot=kw["n_boot"], n_perm=kw["n_perm"], seed=kw["seed"],
                                 ci_method=kw["ci_method"], cluster=kw["cluster"] is not False))
    meta = {"names": list(names), "pairs": [list(p) for p in pairs], "primary": endpoints, "task": task.value,
            "n_resamples": kw["n_boot"], "n_permutations": kw["n_perm"], "seed": kw["seed"],
            "directions": [d.to_dict() for d in kw["directions"]]}
    write_pooled_report(pooled, out, names, meta, overwrite=overwrite)
    console.print(f"pooled {len(pairs)} seeds -> {out}", highlight=False)
    for p in pooled:
        q = p["pooled"]
        console.print(f"primary {p['attribute']}:{p['metric']}: mean reduction {_num(q['diff'])} {_ci(q['ci'])}, "
                      f"p = {_num(q['p_value'], 4)}, Holm p = {_num(q.get('p_holm'), 4)}", highlight=False)
