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
    folds: int = typer.Option(5, "--folds"),
    seed: int = typer.Option(0, "--seed"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    c: float = typer.Option(1.0, "--C", help="Inverse L2 strength of the probe."),
    batch_size: int = typer.Option(8, "--batch-size"),
    dtype: str = typer.Option("float32", "--dtype", help="auto | float32 | bfloat16 | float16"),
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
                                                 batch_size=batch_size, seed=seed, include_answer=include_answer),
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
