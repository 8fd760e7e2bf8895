"""CLI verbs: audit_cmds — ``fairllava audit`` (layer-wise leakage probes over one or more models)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._app import app, console


def _named(spec: str, what: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (name = folder name)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if not name.strip() or not path.strip():
            from ..errors import FairllavaError

            raise FairllavaError(f"{what} {spec!r}: expected PATH or NAME=PATH")
        return name.strip(), path.strip()
    return Path(spec).name or spec, spec


def _vocabs_for(data: Path, vocab_opts: list[str]):
    """--vocab options, else the vocabularies a benchmark datacard next to the data declares, else None."""
    from ..data.attributes import parse_vocab_options, vocabs_from_config

    if vocab_opts:
        return parse_vocab_options(vocab_opts)
    card = data.parent / "datacard.json"
    if card.is_file():
        import json

        cfg = json.loads(card.read_text(encoding="utf-8")).get("vocabs")
        if cfg:
            return vocabs_from_config(cfg)
    return None


@app.command("audit")
def audit_cmd(
    model: List[str] = typer.Option(..., "--model", help="[NAME=]PATH of a model folder; repeat to compare."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter",
                                                help="[NAME=]DIR of a PEFT adapter, applied on the first --model."),
    data: Path = typer.Option(..., "--data", help="Records JSONL (e.g. test.jsonl)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root (default: <data dir>/images)."),
    out: Path = typer.Option(..., "--out", help="Output folder (audit.json, leakage.png, audit.md, features/)."),
    attributes: Optional[str] = typer.Option(None, "--attributes",
                                             help="Comma-separated (default: every attribute in the data)."),
    layers: str = typer.Option("all", "--layers", help="all | comma-separated hidden-state indices"),
    tokens: str = typer.Option("image", "--tokens", help="image | text | all"),
    pooling: str = typer.Option("masked_mean", "--pooling", help="masked_mean | random_token"),
    include_answer: bool = typer.Option(False, "--include-answer/--prompt-only",
                                        help="Teacher-force the reference answer (text tokens then include it)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt",
                                                help="Chat-template system turn the models were trained with "
                                                     "(default: the template's own)."),
    folds: int = typer.Option(5, "--folds"),
    seed: int = typer.Option(0, "--seed"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    c: float = typer.Option(1.0, "--C", help="Inverse L2 strength of the probe."),
    batch_size: int = typer.Option(8, "--batch-size"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where fast) | float32 | bfloat16 | float16"),
    vocab: Optional[List[str]] = typer.Option(None, "--vocab", help="NAME=PRESET attribute vocabulary."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Probe how well each layer's pooled hidden states reveal each demographic attribute."""
    from ..audit import AuditConfig, FeatureConfig, ProbeConfig, parse_layers, run_audit
    from ..errors import FairllavaError
    from ..io import read_jsonl
    from ..models.loading import load_vlm

    records = read_jsonl(data, required=("id", "conversations", "attributes"))
    if not records:
        raise FairllavaError(f"{data}: no records")
    image_root = images if images is not None else data.parent / "images"
    if any(r.get("image") for r in records) and not image_root.is_dir():
        raise FairllavaError(f"{image_root}: image root not found (pass --images)")
    if attributes:
        attrs = [a.strip() for a in attributes.split(",") if a.strip()]
    else:
        attrs = sorted({k for r in records for k in (r.get("attributes") or {})})
    if not attrs:
        raise FairllavaError(f"{data}: records carry no attributes to audit")
    try:
        cfg = AuditConfig(attributes=attrs,
                          features=FeatureConfig(layers=parse_layers(layers), tokens=tokens, pooling=pooling,
                                                 batch_size=batch_size, seed=seed, include_answer=include_answer,
                                                 system_prompt=system_prompt),
                          probe=ProbeConfig(folds=folds, seed=seed, C=c, n_boot=n_boot))
        cfg.validate()
    except ValueError as e:
        raise FairllavaError(str(e)) from None

    entries: dict = {}
    named_models = [_named(m, "--model") for m in model]
    for name, path in named_models:
        entries[name] = (lambda p=path: load_vlm(p, dtype=dtype))
    base = named_models[0][1]
    for spec in adapter or []:
        name, path = _named(spec, "--adapter")
        entries[name] = (lambda p=path: load_vlm(base, dtype=dtype, adapter=p))
    if len(entries) != len(named_models) + len(adapter or []):
        raise FairllavaError("--model/--adapter: names must be unique (use NAME=PATH)")
    vocabs = _vocabs_for(data, list(vocab or []))
    try:
        result = run_audit(entries, records, image_root, out, cfg, vocabs=vocabs, overwrite=overwrite)
    except ValueError as e:
        if isinstance(e, FairllavaError):
            raise
        raise FairllavaError(str(e)) from None
    for a in result["attributes"]:
        parts = []
        for name, m in result["models"].items():
            s = m["attributes"][a]
            parts.append(f"{name} {100 * s['max_balanced_accuracy']:.1f}% @ layer {s['argmax_layer']}")
        chance = 100 * result["attributes"][a]["chance_balanced_accuracy"]
        console.print(f"{a} (chance {chance:.1f}%): peak probe balanced accuracy " + "; ".join(parts))
    console.print(f"wrote {out / 'audit.json'}, {out / 'leakage.png'}, {out / 'audit.md'}")


@app.command("counterfactual")
def counterfactual_cmd(
    model: str = typer.Option(..., "--model", help="[NAME=]PATH of the base model: its frozen vision tower embeds the "
                                                   "images (the same pairs for every adapter/model compared)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="(Not used for matching: pairs come from the base "
                                                                  "model's vision tower, shared by all adapters.)"),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Another model folder whose vision tower embeds "
                                                                  "the images instead of --model's."),
    predictions: List[str] = typer.Option(..., "--predictions", help="[NAME=]PATH predictions JSONL; repeat to score "
                                                                     "several models on the same pairs."),
    data: Path = typer.Option(..., "--data", help="Records JSONL (images, labels, attributes)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root (default: <data dir>/images)."),
    out: Path = typer.Option(..., "--out", help="Output folder (counterfactual.json)."),
    attribute: str = typer.Option(..., "--attribute", help="Attribute whose groups are paired, e.g. sex."),
    groups: Optional[str] = typer.Option(None, "--groups", help="A,B (default: the two values present)."),
    task: str = typer.Option("vqa", "--task", help="vqa | report"),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated per-sample metrics."),
    min_similarity: float = typer.Option(-1.0, "--min-similarity",
                                         help="Cosine threshold on centred embeddings (-1: keep all matches)."),
    n_boot: int = typer.Option(1000, "--n-boot"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Counterfactual matched pairs: |Δ metric| between same-label, look-alike samples of two groups."""
    from ..audit import run_counterfactual
    from ..errors import FairllavaError
    from ..io import read_jsonl
    from ..models.loading import load_vlm

    if task not in ("vqa", "report"):
        raise FairllavaError(f"--task {task!r}: expected vqa or report")
    pair = None
    if groups:
        parts = [g.strip() for g in groups.split(",")]
        if len(parts) != 2 or not all(parts):
            raise FairllavaError(f"--groups {groups!r}: expected exactly two values, e.g. F,M")
        pair = (parts[0], parts[1])
    records = read_jsonl(data, required=("id", "attributes"))
    image_root = images if images is not None else data.parent / "images"
    name, path = _named(model, "--model")
    sets = dict(_named(p, "--predictions") for p in predictions)
    if len(sets) != len(predictions):
        raise FairllavaError("--predictions: names must be unique (use NAME=PATH)")
    if len(sets) == 1 and not any("=" in p and not Path(p).exists() for p in predictions):
        sets = {name: next(iter(sets.values()))}
    enc_path = encoder or path
    enc, proc = load_vlm(enc_path, dtype=dtype)
    if adapter:
        console.print(f"note: --adapter {adapter} is not applied: pairs come from the vision tower of {enc_path}")
    res = run_counterfactual(enc, proc, records, image_root, sets, out, attribute=attribute, groups=pair,
                             task=task, metrics=[s.strip() for s in metrics.split(",")] if metrics else None,
                             min_similarity=min_similarity, n_boot=n_boot, seed=seed, batch_size=batch_size,
                             name=name, overwrite=overwrite, encoder_name=str(enc_path))
    console.print(f"{res['n_pairs']} pairs ({attribute}: {res['groups'][0]} vs {res['groups'][1]}) from "
                  f"{res['n_samples']} samples, embedded by the vision tower of {enc_path}")
    for mname, gaps in res["models"].items():
        for metric, g in gaps.items():
            if g["mean_abs_diff"] is None:
                continue
            ci = f" [{g['ci'][0]:.1f}, {g['ci'][1]:.1f}]" if g.get("ci") else ""
            console.print(f"  {mname}: mean |Δ {metric}| = {g['mean_abs_diff']:.1f}{ci}")
    console.print(f"wrote {out / 'counterfactual.json'}")
