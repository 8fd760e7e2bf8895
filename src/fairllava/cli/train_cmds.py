"""CLI verbs for training: ``fairllava train`` and ``fairllava presets``.

Thin layer over :mod:`fairllava.training`; run under ``accelerate launch`` for several processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ._app import app, console


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="Run config YAML (may start with `preset: NAME`)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key: --set optim.lr=2e-4 (value parsed as YAML). Repeatable."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Base preset (see `fairllava presets`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint in the output dir."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run directory (overrides output_dir)."),
) -> None:
    """Train a stage-1 projector or a stage-2 LoRA run (FairLLaVA or a baseline)."""
    from ..errors import FairllavaError
    from ..training import load_config, train

    if config is None and preset is None:
        raise FairllavaError("train: give a CONFIG.yaml and/or --preset NAME")
    overrides = list(set_)
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    cfg = load_config(config, overrides, preset_name=preset)
    run_dir = train(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        console.print(f"[green]done:[/green] {run_dir}", highlight=False)


@app.command("presets")
def presets_cmd() -> None:
    """List the packaged training presets."""
    from ..training.config import list_presets, preset_dict

    for name in list_presets():
        d = preset_dict(name)
        attrs = ",".join((d.get("fairness") or {}).get("attributes") or {})
        typer.echo(f"{name}\tmethod={d.get('method')}\tstage={d.get('stage')}\tattributes={attrs}")
