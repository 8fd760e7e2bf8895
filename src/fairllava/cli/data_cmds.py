"""CLI verbs for data: ``fairllava validate`` and the ``fairllava prepare NAME`` group.

``prepare_app`` is exported so other modules can add preparers (``@prepare_app.command("shortcut")``).
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ._app import app, console

prepare_app = typer.Typer(
    help="Prepare a dataset from its raw files as fairllava records (train/val/test JSONL + datacard.json).",
    no_args_is_help=True,
)
app.add_typer(prepare_app, name="prepare")


class ImageCheck(str, Enum):
    verify = "verify"
    load = "load"
    exists = "exists"
    none = "none"


class Missing(str, Enum):
    drop = "drop"
    keep = "keep"


class AgeSource(str, Enum):
    anchor = "anchor"
    study = "study"


class RaceRule(str, Enum):
    earliest = "earliest"
    most_frequent = "most-frequent"


@app.command()
def validate(
    data: List[Path] = typer.Argument(..., help="One or more record JSONL files (several: also checks split leaks)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root the records' paths are relative to."),
    vocab: List[str] = typer.Option([], "--vocab", help="NAME=PRESET (sex, age_group, race8, race5) or NAME=CLASS,CLASS,... "
                                    "e.g. race=race5 or race=light,dark. Standard names default to sex/age_group/race8."),
    image_check: ImageCheck = typer.Option(ImageCheck.verify, "--image-check",
                                           help="verify (header, fast), load (full decode), exists, none."),
    require_group_id: bool = typer.Option(False, "--require-group-id", help="Every record must have group_id."),
) -> None:
    """Check record files; print one line per problem (file:line (id=...): problem) and exit 1 if any."""
    from ..data.attributes import parse_vocab_options
    from ..data.validate import validate_dataset

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    vocabs = parse_vocab_options(vocab)
    with Progress(SpinnerColumn(), TextColumn("validating: {task.completed} lines"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("validate", total=None)
        seen = [0]

        def tick() -> None:
            seen[0] += 1
            if seen[0] % 1000 == 0:
                bar.update(task, completed=seen[0])

        res = validate_dataset(data, images, vocabs, image_check=image_check.value,
                               require_group_id=require_group_id, on_record=tick)
    for p in res.problems:
        typer.echo(str(p))
    table = Table(title=f"{res.n_records} records in {res.n_files} file(s)")
    table.add_column("attribute")
    table.add_column("group")
    table.add_column("records", justify="right")
    for attr, counts in res.groups.items():
        for j, (value, n) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))):
            table.add_row(attr if j == 0 else "", str(value), str(n))
    console.print(table)
    if res.problems:
        console.print(f"[red]{len(res.problems)} problem(s)[/red]")
        raise typer.Exit(1)
    console.print("[green]ok[/green]")


def _print_card(card: dict, out: Path) -> None:
    table = Table(title=f"{card['dataset']} -> {out}")
    table.add_column("split")
    table.add_column("records", justify="right")
    table.add_column("groups", justify="right")
    for attr in card["attributes"]:
        table.add_column(attr)
    for split, s in card["splits"].items():
        cells = [", ".join(f"{k}:{v}" for k, v in s["attributes"][a].items()) for a in card["attributes"]]
        table.add_row(split, str(s["records"]), str(s["groups"]), *cells)
    console.print(table)
    if card["dropped"]:
        d = Table(title=f"dropped rows ({card['total_dropped']})")
        d.add_column("reason")
        d.add_column("rows", justify="right")
        for reason, n in card["dropped"].items():
            d.add_row(reason, str(n))
        console.print(d)


_OUT = typer.Option(..., "--out", help="Output folder (built atomically).")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output folder.")
_SEED = typer.Option(0, "--seed", help="Split seed.")
_VAL = typer.Option(0.1, "--val-frac", help="Fraction of groups in val.")
_TEST = typer.Option(0.1, "--test-frac", help="Fraction of groups in test.")


@prepare_app.command("mimic-cxr")
def prepare_mimic(
    annotations: List[str] = typer.Option(..., "--annotations", help="LLaVA-Rad annotation JSON; tag with the split "
                                          "(train=PATH, val=PATH, test=PATH) or give untagged files to split by subject."),
    patients: Path = typer.Option(..., "--patients", help="MIMIC-IV hosp patients.csv(.gz)."),
    admissions: Path = typer.Option(..., "--admissions", help="MIMIC-IV hosp admissions.csv(.gz) (race or ethnicity)."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="mimic-cxr-2.0.0-metadata.csv(.gz) (views, StudyDate)."),
    age_source: AgeSource = typer.Option(AgeSource.anchor, "--age-source", help="anchor_age or age at study (needs --metadata)."),
    race_rule: RaceRule = typer.Option(RaceRule.earliest, "--race-rule", help="Race from the earliest admission or the most frequent known value."),
    indication: bool = typer.Option(True, "--indication/--no-indication", help="Put the indication into the prompt."),
    missing: Missing = typer.Option(Missing.drop, "--missing", help="Rows with missing demographics: drop (reference) or keep (masked)."),
    all_test: bool = typer.Option(False, "--all-test", help="Keep non-rule-based test rows (default: rule-based only)."),
    seed: int = _SEED, val_frac: float = _VAL, test_frac: float = _TEST,
    out: Path = _OUT, overwrite: bool = _OVERWRITE,
) -> None:
    """MIMIC-CXR findings generation with MIMIC-IV demographics (EVALUATION.md §2.1)."""
    from ..data.preparers.mimic_cxr import MimicConfig, prepare_mimic_cxr

    cfg = MimicConfig(annotations=list(annotations), patients=str(patients), admissions=str(admissions),
                      metadata=str(metadata) if metadata else None, age_source=age_source.value,
                      race_rule=race_rule.value, indication=indication, missing=missing.value,
                      rule_based_test=not all_test, seed=seed, val_frac=val_frac, test_frac=test_frac)
    _print_card(prepare_mimic_cxr(cfg, out, overwrite=overwrite, progress=True), out)


@prepare_app.command("padchest")
def prepare_padchest_cmd(
    csv: Path = typer.Option(..., "--csv", help="PadChest CSV (ImageID, StudyDate_DICOM, PatientBirth, PatientSex_DICOM, Projection, Report)."),
    reports: Optional[Path] = typer.Option(None, "--reports", help="Converted JSON with ImageID, FINDINGS, INDICATION."),
    image_template: str = typer.Option("{ImageDir}/{ImageID}", "--image-template", help="Image path; fields ImageID, ImageDir, PatientID."),
    indication: bool = typer.Option(True, "--indication/--no-indication"),
    missing: Missing = typer.Option(Missing.drop, "--missing"),
    seed: int = _SEED, val_frac: float = _VAL, test_frac: float = _TEST,
    out: Path = _OUT, overwrite: bool = _OVERWRITE,
) -> None:
    """PadChest PA findings generation with sex and age (EVALUATION.md §2.2)."""
    from ..data.preparers.padchest import PadChestConfig, prepare_padchest

    cfg = PadChestConfig(csv=str(csv), reports=str(reports) if reports else None, image_template=image_template,
                         indication=indication, missing=missing.value, seed=seed, val_frac=val_frac, test_frac=test_frac)
    _print_card(prepare_padchest(cfg, out, overwrite=overwrite), out)


@prepare_app.command("ham10000")
def prepare_ham_cmd(
    metadata: Path = typer.Option(..., "--metadata", help="HAM10000_metadata.csv."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="SelfSynthX-style QA JSON ({image_id, new_QA:[{Q,A}]}); default: templates."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root; files are found by image_id stem (part_1/part_2)."),
    image_template: str = typer.Option("{image_id}.jpg", "--image-template", help="Image path when --images is not given."),
    stratify: bool = typer.Option(True, "--stratify/--no-stratify", help="Stratify the lesion split by dx."),
    missing: Missing = typer.Option(Missing.keep, "--missing", help="Missing age/sex: keep (null; task metrics) or drop."),
    seed: int = _SEED, val_frac: float = _VAL, test_frac: float = _TEST,
    out: Path = _OUT, overwrite: bool = _OVERWRITE,
) -> None:
    """HAM10000 dermoscopy VQA, split by lesion_id (EVALUATION.md §2.3)."""
    from ..data.preparers.ham10000 import HamConfig, prepare_ham10000

    cfg = HamConfig(metadata=str(metadata), qa=str(qa) if qa else None, images=str(images) if images else None,
                    image_template=image_template, stratify=stratify, missing=missing.value, seed=seed,
                    val_frac=val_frac, test_frac=test_frac)
    _print_card(prepare_ham10000(cfg, out, overwrite=overwrite), out)


@prepare_app.command("iu-xray")
def prepare_iu_cmd(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with NLMCXR_reports.tgz and "
                                            "nlmcxr_dicom_metadata.csv.gz (default: the installed torchxrayvision wheel)."),
    image_template: str = typer.Option("{image_id}.png", "--image-template", help="Image path; fields image_id, report_id, n."),
    with_image: bool = typer.Option(True, "--image/--no-image", help="Records with an image path, or text-only."),
    indication: bool = typer.Option(False, "--indication/--no-indication", help="Indication in the prompt (off: it reveals sex)."),
    require_frontal: bool = typer.Option(False, "--require-frontal", help="Keep only reports with a PA/AP image."),
    missing: Missing = typer.Option(Missing.keep, "--missing"),
    seed: int = _SEED, val_frac: float = _VAL, test_frac: float = _TEST,
    out: Path = _OUT, overwrite: bool = _OVERWRITE,
) -> None:
    """IU X-ray reports from the torchxrayvision wheel (EVALUATION.md §2.4; CC BY-NC-ND: do not redistribute)."""
    from ..data.preparers.iu_xray import IUConfig, prepare_iu_xray

    cfg = IUConfig(data_dir=str(data_dir) if data_dir else None, image_template=image_template, with_image=with_image,
                   indication=indication, require_frontal=require_frontal, missing=missing.value, seed=seed,
                   val_frac=val_frac, test_frac=test_frac)
    _print_card(prepare_iu_xray(cfg, out, overwrite=overwrite), out)
