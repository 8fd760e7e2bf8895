"""CLI verbs: ``fairllava benchmark run|report|check`` — the pre-registered multi-seed comparison (docs/protocol.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import app, console

benchmark_app = typer.Typer(help="Run a benchmark plan (resumable) and build its leaderboard.", no_args_is_help=True)
app.add_typer(benchmark_app, name="benchmark")


def _log(msg: str) -> None:
    console.print(msg, highlight=False, markup=False, soft_wrap=True)


@benchmark_app.command("check")
def check_cmd(
    plan: Path = typer.Argument(..., help="Plan YAML (configs/benchmark/*.yaml)."),
    against: list[Path] = typer.Option([], "--against", help="Finished selection results folder(s): also check that "
                                       "the plan holds exactly the settings they chose (repeat per folder)."),
) -> None:
    """Validate a plan and list its steps without running anything."""
    from ..benchmark.plan import load_plan
    from ..benchmark.runner import plan_steps
    from ..errors import FairllavaError

    p = load_plan(plan)
    steps = plan_steps(p)
    runs = [s for s in steps if s.kind == "run"]
    typer.echo(f"{plan}: ok (hash {p.hash}); {len(steps)} steps, {len(runs)} runs: "
               f"{len(p.tasks)} task(s) x methods {', '.join(p.method_variants())} x splits {', '.join(p.splits)}")
    if against:
        from ..benchmark.freeze import check_frozen, frozen_markdown

        rows = check_frozen(p, against)
        bad = [r for r in rows if not r["ok"]]
        typer.echo(frozen_markdown(rows, mismatches_only=bool(bad)))
        if bad:
            b = bad[0]
            raise FairllavaError(f"{plan}: {len(bad)} setting(s) differ from the selection in "
                                 f"{', '.join(map(str, against))}; first: {b['task']} {b['method']} {b['setting']} = "
                                 f"{b['final']!r}, selected {b['selected']!r} ({b['what']})")
        typer.echo(f"{plan}: holds the settings chosen in {', '.join(map(str, against))}")


@benchmark_app.command("run")
def run_cmd(
    plan: Path = typer.Argument(..., help="Plan YAML (configs/benchmark/*.yaml)."),
    out: Path = typer.Option(..., "--out", help="Results folder (resumable: finished runs are never redone)."),
    jobs: int = typer.Option(1, "--jobs", help="Runs at a time, each in its own worker process."),
    threads_per_job: Optional[int] = typer.Option(None, "--threads-per-job",
                                                  help="CPU threads per run (default: all cores / jobs)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the leaderboard into --out at the end."),
) -> None:
    """Run (or resume) every (task, strength, seed, method, split) of a plan, then write the leaderboard."""
    from ..benchmark.plan import load_plan
    from ..benchmark.runner import run_sweep

    p = load_plan(plan)  # every plan error before any run
    res = run_sweep(p, out, jobs=jobs, threads=threads_per_job, plan_text=plan.read_text(encoding="utf-8"), log=_log)
    _log(f"{len(res.ran)} step(s) run, {len(res.done)} already finished, {len(res.rerun_corrupt)} corrupt re-run "
         f"({res.seconds / 60:.1f} min)")
    if report:
        _report(out, out)


@benchmark_app.command("report")
def report_cmd(
    results: list[Path] = typer.Argument(..., help="Results folder(s) of `fairllava benchmark run`; several (plans "
                                         "of different tasks) make one leaderboard with one primary family."),
    to: Optional[Path] = typer.Option(None, "--to", help="Folder for the leaderboard files (default: the results "
                                      "folder; required with several)."),
    head_to_head: Optional[str] = typer.Option(None, "--head-to-head", help="Also compare this method directly "
                                               "with every other non-baseline method (secondary, unadjusted)."),
    update_readme: Optional[Path] = typer.Option(None, "--update-readme", help="Also write the headline tables, "
                                                 "verdicts and plots between this file's benchmark-results markers."),
    primary_methods: Optional[str] = typer.Option(None, "--primary-methods", help="Comma-separated: Holm and the "
                                                  "verdicts over these methods vs the baseline only (the protocol's "
                                                  "§7 fallback family); the leaderboard says so."),
) -> None:
    """Leaderboard (markdown, CSV, HTML with plots, JSON) from the finished runs of a results folder."""
    from ..errors import FairllavaError

    if len(results) > 1 and to is None:
        raise FairllavaError("benchmark report: several results folders need --to (where the combined leaderboard goes)")
    if update_readme is not None:  # before any work: a README without the markers is an error, not a lost report
        from ..benchmark.report import README_BEGIN, README_END

        text = update_readme.read_text(encoding="utf-8") if update_readme.is_file() else ""
        if README_BEGIN not in text or README_END not in text:
            raise FairllavaError(f"{update_readme}: missing the {README_BEGIN} / {README_END} markers")
    methods = [m.strip() for m in primary_methods.split(",") if m.strip()] if primary_methods is not None else None
    _report(results, to or results[0], head_to_head, update_readme, methods)


@benchmark_app.command("power")
def power_cmd(
    results: Path = typer.Argument(..., help="Results folder with a leaderboard.json (e.g. the selection runs)."),
    task: Optional[str] = typer.Option(None, "--task", help="Task (default: every task of the leaderboard)."),
    seeds: str = typer.Option("3,4,5,6,8,10", "--seeds", help="Seed counts to tabulate."),
    n_per_cell: str = typer.Option("50,100,200", "--n-per-cell", help="Test sizes per group x label cell."),
    final: list[Path] = typer.Option([Path("configs/benchmark/final-derm.yaml"), Path("configs/benchmark/final-cxr.yaml")],
                                     "--final", help="The final plan(s) whose primary family sets m (Holm's first "
                                     "step uses alpha / m)."),
    family_size: Optional[int] = typer.Option(None, "--family-size", help="m directly, instead of --final."),
) -> None:
    """Power to detect a halving of the baseline's signed gap, from the leaderboard's own variances."""
    from ..benchmark.plan import load_plan
    from ..benchmark.power import family_size_of, power_markdown, power_table
    from ..benchmark.report import read_leaderboard
    from ..errors import FairllavaError

    if family_size is None:
        missing = [str(f) for f in final if not f.is_file()]
        if missing:
            raise FairllavaError(f"benchmark power: final plan {missing[0]} not found (give --final PLAN per final "
                                 "plan, or --family-size N)")
        family_size = family_size_of([load_plan(f) for f in final])
        typer.echo(f"primary family of {', '.join(map(str, final))}: m = {family_size}")
    if family_size < 1:
        raise FairllavaError(f"benchmark power: --family-size: expected >= 1, got {family_size}")
    if not (results / "leaderboard.json").is_file():
        raise FairllavaError(f"{results}: no leaderboard.json (run `fairllava benchmark report {results}` first)")
    board = read_leaderboard(results)
    try:
        S = [int(x) for x in seeds.split(",")]
        N = [int(x) for x in n_per_cell.split(",")]
    except ValueError:
        raise FairllavaError("--seeds/--n-per-cell: expected comma-separated integers") from None
    for t in [task] if task else list(dict.fromkeys(r["task"] for r in board["rows"])):
        typer.echo(power_markdown(power_table(board, t, seeds=S, n_per_cell=N, family_size=family_size)))


def _report(results, to: Path, head_to_head: Optional[str] = None, readme: Optional[Path] = None,
            primary_methods: Optional[list] = None) -> None:
    from ..benchmark.leaderboard import build_leaderboard, combine_leaderboards
    from ..benchmark.report import write_leaderboard
    from ..benchmark.runner import load_folder_plan

    folders = [results] if isinstance(results, Path) else list(results)
    board = combine_leaderboards([build_leaderboard(f, log=_log, head_to_head=head_to_head) for f in folders],
                                 [load_folder_plan(f) for f in folders], primary_methods)
    files = write_leaderboard(board, to)
    for r in board["rows"]:
        if r.get("verdict") and r["verdict"]["adjusted"]:
            _log("  " + r["verdict"]["text"])
    missing = (board.get("family") or {}).get("missing_tasks") or []
    state = (f"partial: {board['runs']['finished']} of {board['runs']['total']} runs"
             + (f"; the primary family's {', '.join(missing)} not included" if missing and board["partial"] else "")
             if board["partial"] else f"{board['runs']['finished']} runs")
    _log(f"leaderboard ({state}): {', '.join(str(f) for f in files.values())}")
    if readme is not None:
        from ..benchmark.report import update_readme

        update_readme(board, to, readme)
        _log(f"{readme}: results block updated")
