"""CLI verbs: demo_cmds — ``fairllava prepare shortcut`` (below) and ``fairllava demo``.

Each part lives in its own clearly separated function so the two owners never edit the same lines.
"""
from ._app import app, console  # noqa: F401


# --------------------------------------------------------------------------- prepare shortcut (benchmark)
def _register_prepare_shortcut() -> None:
    """Register ``fairllava prepare shortcut`` on the ``prepare`` sub-app of data_cmds."""
    from pathlib import Path

    import typer

    from . import data_cmds

    prepare_app = getattr(data_cmds, "prepare_app", None)
    if prepare_app is None:  # data_cmds has not created the ``prepare`` group (yet): make it here
        prepare_app = typer.Typer(help="Prepare datasets as fairllava records.", no_args_is_help=True)
        app.add_typer(prepare_app, name="prepare")

    @prepare_app.command("shortcut")
    def prepare_shortcut_cmd(
        out: Path = typer.Option(..., "--out", help="Output folder (train/val/test.jsonl, images/, datacard.json)."),
        task: str = typer.Option("derm-vqa", "--task", help="derm-vqa | cxr-report"),
        seed: int = typer.Option(0, "--seed"),
        strength: float = typer.Option(1.0, "--shortcut-strength", help="S in [0,1]; 0 = no shortcut."),
        n_train: int = typer.Option(1200, "--n-train"),
        n_val_per_cell: int = typer.Option(10, "--n-val-per-cell", help="Per group x label cell."),
        n_test_per_cell: int = typer.Option(50, "--n-test-per-cell", help="Per group x label cell."),
        image_size: int = typer.Option(128, "--image-size"),
        minority_frac: float = typer.Option(0.3, "--minority-frac"),
        evidence_probe: bool = typer.Option(True, "--evidence-probe/--no-evidence-probe"),
        evidence_features: str = typer.Option("pixels", "--evidence-features", help="pixels | efficientnet"),
        n_probe_per_cell: int = typer.Option(100, "--n-probe-per-cell", help="Evidence-probe sample per cell."),
        iu_data_dir: Path = typer.Option(None, "--iu-data-dir",
                                         help="cxr-report: folder with NLMCXR_reports.tgz and "
                                              "nlmcxr_dicom_metadata.csv.gz (default: the torchxrayvision wheel)."),
        overwrite: bool = typer.Option(False, "--overwrite"),
    ) -> None:
        """Render the shortcut benchmark (a demographic shortcut of controllable strength)."""
        from ..benchmark.prepare import prepare_shortcut
        from ..errors import FairllavaError

        try:
            card = prepare_shortcut(task, out, seed=seed, strength=strength, n_train=n_train,
                                    n_val_per_cell=n_val_per_cell, n_test_per_cell=n_test_per_cell,
                                    image_size=image_size, minority_frac=minority_frac,
                                    evidence_probe=evidence_probe, evidence_features=evidence_features,
                                    n_probe_per_cell=n_probe_per_cell,
                                    iu_data_dir=iu_data_dir, overwrite=overwrite)
        except FairllavaError:
            raise
        except ValueError as e:  # library-argument errors -> one-line CLI errors
            raise FairllavaError(str(e)) from None
        c = card["counts"]
        console.print(f"{task}: train {c['train']['n']}, val {c['val']['n']}, test {c['test']['n']} samples -> {out}")
        tr = c["train"]["race_x_label"]
        for tone, row in tr.items():
            console.print(f"  train {tone}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
        if card["evidence_probe"]:
            pg = card["evidence_probe"]["per_group"]
            console.print("  evidence probe (within-group balanced accuracy): "
                          + ", ".join(f"{g} {v['balanced_accuracy']:.2f}" for g, v in pg.items()))


_register_prepare_shortcut()


# --------------------------------------------------------------------------- demo (end to end)
def _register_demo() -> None:
    from pathlib import Path

    import typer

    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("demo_out"), "--out", help="Run folder (resumable: finished steps are skipped)."),
        preset: str = typer.Option("default", "--preset", help="default (real offline parts, sized for ~6 min) | full (the benchmark sizes, ~13 min) | smoke (tiny, ~1 min)"),
        seed: int = typer.Option(0, "--seed"),
        update_readme: Path = typer.Option(None, "--update-readme",
                                           help="Write the results table into this README between the demo-results markers."),
    ) -> None:
        """A one-seed preset of the shortcut benchmark: vanilla LoRA vs FairLLaVA, evaluated and audited."""
        from ..demo import get_preset, run_demo, update_readme as _update

        get_preset(preset)  # a clear error before any work
        res = run_demo(out, preset, seed=seed, log=lambda m: console.print(m, highlight=False, markup=False))
        typer.echo(res.summary_md)
        console.print(f"leaderboard: {out / 'leaderboard.html'}  ({res.seconds / 60:.1f} min)")
        if update_readme is not None:
            _update(update_readme, res.summary_md)
            console.print(f"updated {update_readme}")


_register_demo()
