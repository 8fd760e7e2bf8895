"""CLI verbs ``evaluate`` and ``compare``: thin wrappers over fairllava.fairness and fairllava.report."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

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
            stratified, clinical) -> dict:
    if n_min < 1:
        raise FairllavaError(f"--n-min must be >= 1, got {n_min}")
    if n_boot < 0:
        raise FairllavaError(f"--n-boot must be >= 0, got {n_boot}")
    if labels is not None and task != Task.vqa:
        raise FairllavaError("--labels only applies to --task vqa")
    return dict(attributes=_split(attributes, "attributes"), n_min=n_min, n_boot=n_boot, seed=seed,
                es_variant=es_variant.value, labels=_split(labels, "labels"), metrics=_split(metrics, "metrics"),
                bootstrap=bootstrap.value, intersections=intersections, stratified=stratified,
                scorers=_scorers(clinical), progress=True)


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


@app.command()
def evaluate(
    predictions: Path = typer.Option(..., "--predictions", help="Predictions JSONL (id, prediction, reference, attributes[, label])."),
    task: Task = typer.Option(Task.report, "--task"),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    attributes: Optional[str] = _ATTR, n_min: int = _NMIN, n_boot: int = _NBOOT, seed: int = _SEED,
    es_variant: ESVariant = _ES, labels: Optional[str] = _LABELS, metrics: Optional[str] = _METRICS,
    bootstrap: Bootstrap = _BOOT, intersections: bool = _INTER, stratified: bool = _STRAT,
    clinical: Optional[str] = _CLIN, overwrite: bool = _OVER,
) -> None:
    """Per-group metrics, gaps, equity-scaled scores and bootstrap CIs for one predictions file."""
    from ..fairness import evaluate_predictions
    from ..report import write_evaluation

    if out.exists() and not overwrite:
        raise FairllavaError(f"{out}: already exists (pass --overwrite to replace it)")
    kw = _common(task, attributes, n_min, n_boot, seed, es_variant, labels, metrics, bootstrap, intersections,
                 stratified, clinical)
    result = evaluate_predictions(predictions, task.value, **kw)
    write_evaluation(result, out, overwrite=overwrite)
    console.print(f"evaluated {result.n} samples, {len(result.metrics)} metrics, {len(result.attributes)} attributes "
                  f"-> {out}", highlight=False)
    for m, why in result.skipped.items():
        console.print(f"[yellow]skipped {m}:[/yellow] {why}", highlight=False)


@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="Baseline predictions JSONL (A)."),
    method: Path = typer.Argument(..., help="Method predictions JSONL (B)."),
    task: Task = typer.Option(Task.report, "--task"),
    out: Path = typer.Option(..., "--out", help="Output folder for the combined report."),
    names: str = typer.Option("baseline,method", "--names", help="Display names of A and B."),
    holm: bool = typer.Option(False, "--holm", help="Add Holm-adjusted p-values over the table."),
    strict_ids: bool = typer.Option(False, "--strict-ids", help="Fail unless both files have exactly the same ids."),
    attributes: Optional[str] = _ATTR, n_min: int = _NMIN, n_boot: int = _NBOOT, seed: int = _SEED,
    es_variant: ESVariant = _ES, labels: Optional[str] = _LABELS, metrics: Optional[str] = _METRICS,
    bootstrap: Bootstrap = _BOOT, intersections: bool = _INTER, stratified: bool = _STRAT,
    clinical: Optional[str] = _CLIN, overwrite: bool = _OVER,
) -> None:
    """Paired bootstrap p-values for gap and ES differences of two systems on their shared ids."""
    from ..fairness import compare as compare_fn
    from ..report import write_comparison_report

    if out.exists() and not overwrite:
        raise FairllavaError(f"{out}: already exists (pass --overwrite to replace it)")
    pair = _split(names, "names")
    if len(pair) != 2 or pair[0] == pair[1]:
        raise FairllavaError(f"--names: expected two different names like 'baseline,method', got {names!r}")
    if n_boot < 1:
        raise FairllavaError("--n-boot must be >= 1 for compare (p-values need resamples)")
    kw = _common(task, attributes, n_min, n_boot, seed, es_variant, labels, metrics, bootstrap, intersections,
                 stratified, clinical)
    res = compare_fn(baseline, method, task.value, names=tuple(pair), holm_correction=holm, strict_ids=strict_ids, **kw)
    write_comparison_report(res.results, res.pvalues, out, overwrite=overwrite, meta=res.meta)
    console.print(f"compared {res.meta['n_shared']} shared ids ({res.meta['n_only_first']} only in {pair[0]}, "
                  f"{res.meta['n_only_second']} only in {pair[1]}) -> {out}", highlight=False)
