"""Leaderboard files: ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` (with plots), ``leaderboard.json``.

All four come from one leaderboard dict (leaderboard.py); the markdown and HTML walk one block list
(``fairllava.report.document``), so they say the same thing. The headline markdown is also what the README
and the demo show.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from ..io import atomic_path, atomic_write_json, atomic_write_text
from ..report.document import Figure, Heading, Para, Table
from .verdict import verdict_label

FILES = ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "leaderboard.json")


def _v(cell: Optional[dict], digits: int = 1, ci: bool = True) -> str:
    if not cell or cell.get("value") is None:
        return "–"
    s = f"{cell['value']:.{digits}f}"
    if ci and cell.get("ci"):
        s += f" [{cell['ci'][0]:.{digits}f}, {cell['ci'][1]:.{digits}f}]"
    return s


def _p(p: Optional[float]) -> str:
    return "–" if p is None else f"{p:.3g}"


def cell_rows(board: dict, task: str, strength: float, split: str) -> list[dict]:
    return [r for r in board["rows"] if (r["task"], r["strength"], r["split"]) == (task, strength, split)]


def cells(board: dict) -> list[tuple[str, float, str]]:
    seen: list = []
    for r in board["rows"]:
        c = (r["task"], r["strength"], r["split"])
        if c not in seen:
            seen.append(c)
    return seen


def _neg(ci):
    return None if ci is None else [-ci[1], -ci[0]]


def cell_table(board: dict, task: str, strength: float, split: str) -> Table:
    from .stats import SIGNATURE

    rows = cell_rows(board, task, strength, split)
    adv, dis = rows[0]["direction"]["advantaged"], rows[0]["direction"]["disadvantaged"]
    m = rows[0]["primary_metric"]
    head = ["method", "seeds", f"{m} overall", adv, dis, f"signed gap {adv}−{dis}", "p (gap = 0)", "ES",
            f"{rows[0]['signature_label']} FPR {dis} / {adv}", f"gap reduction vs {board['baseline']}", "p", "verdict"]
    leak = any(r.get("leakage") for r in rows)
    if leak:
        head += ["probe@0 within-label", "probe@reg within-label"]
    body = []
    for r in rows:
        mm, sig = r["metrics"][m], r["metrics"][SIGNATURE]
        v = r.get("verdict")
        line = [r["method"], len(r["seeds"]), _v(mm["overall"]), _v(mm["groups"][adv]), _v(mm["groups"][dis]),
                _v(mm["signed_gap"]), _p(mm["signed_gap"]["p_value"]), _v(mm["es"], ci=False),
                f"{_v(sig['groups'][dis], 0, False)} / {_v(sig['groups'][adv], 0, False)}",
                "–" if not v else _v({"value": v["reduction"], "ci": v["reduction_ci"]}),
                "–" if not v else (_p(v["p"]) + (" (Holm)" if v["adjusted"] else "")),
                "baseline" if r["method"] == board["baseline"] else
                verdict_label(v)]
        if leak:
            lk = r.get("leakage") or {}
            line += [_num((lk.get("index0") or {}).get("within_label")),
                     _num((lk.get("regularised") or {}).get("within_label"))
                     + (f" (index {lk['regularised_layer']})" if lk else "")]
        body.append(line)
    return Table(head, body)


def _num(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def headline_markdown(board: dict, title: Optional[str] = None) -> str:
    """The headline tables (primary endpoint, every cell) and the verdict lines: the README / demo block."""
    from ..report.markdown import render_markdown

    blocks = []
    for task, strength, split in cells(board):
        blocks.append(Para(f"**{task}, S = {strength:g}, {split} split**"))
        blocks.append(cell_table(board, task, strength, split))
    from .power import design_power, design_power_text

    lines = [r["verdict"]["text"] for r in board["rows"] if r.get("verdict")]
    lines += [design_power_text(res) for res in design_power(board)] if lines else []
    md = (f"{title}\n\n" if title else "")
    if board.get("partial"):  # said first, not after the numbers
        md += provenance(board) + "\n\n"
    md += render_markdown(blocks)
    if lines:
        md += "\n" + "\n".join(f"- {t}" for t in lines) + "\n"
    if not board.get("partial"):
        md += "\n" + provenance(board) + "\n"
    return md


README_BEGIN = "<!-- benchmark-results:begin -->"
README_END = "<!-- benchmark-results:end -->"


def readme_block(board: dict, leaderboard_dir: str | Path, readme: str | Path) -> str:
    """The README's results block: the headline tables, verdicts, design power and one plot per task, linked
    relative to the README, with the command that regenerates it. Why generated: numbers typed by hand drift.
    While runs are missing it holds only the status line: a half-run sweep's numbers rest on too few seeds."""
    import os

    where = Path(os.path.relpath(Path(leaderboard_dir).resolve(), Path(readme).resolve().parent)).as_posix()
    runs = board["runs"]
    if runs["missing"] or runs["corrupt"]:  # no numbers in the README from a sweep that is still running
        return (f"{provenance(board)}\n\nNo numbers here until every run of these sweeps has finished (the partial "
                f"leaderboard: [{where}/leaderboard.md]({where}/leaderboard.md)).\n")
    md = headline_markdown(board)
    for task in dict.fromkeys(r["task"] for r in board["rows"]):
        md += f"\n![{task}: signed gap per method]({where}/leaderboard_{task}.png)\n"
    md += (f"\nFull leaderboard (per-group values, secondaries, leakage probes, head-to-head): "
           f"[{where}/leaderboard.md]({where}/leaderboard.md). Regenerated by `make benchmark`.\n")
    return md


def update_readme(board: dict, leaderboard_dir: str | Path, readme: str | Path) -> None:
    from ..demo import update_readme as replace_block

    replace_block(readme, readme_block(board, leaderboard_dir, readme), README_BEGIN, README_END)


def provenance(board: dict) -> str:
    runs, missing = board["runs"], (board.get("family") or {}).get("missing_tasks") or []
    part = ""
    if runs["missing"] or runs["corrupt"]:
        part += (f" **Partial**: {runs['finished']} of {runs['total']} runs finished"
                 + (f", {runs['corrupt']} corrupt (left out)" if runs["corrupt"] else "") + ".")
    if board["partial"] and missing:
        part += (f" **Partial**: the primary family also spans {', '.join(missing)}, not in this leaderboard "
                 "(`fairllava benchmark report` with every task's results folder gives the declared family).")
    sources = board.get("sources") or [board]
    plans = "; ".join(
        f"plan `{s['plan_name']}` (hash {s['plan_hash']}), code commit `{str(s['code'].get('commit'))[:10]}` "
        f"(code hash {s['code'].get('code_hash')}{', uncommitted changes' if s['code'].get('dirty') else ''})"
        + (f", partial: {s['runs']['finished']} of {s['runs']['total']} runs" if len(sources) > 1 and s["partial"] else "")
        for s in sources)
    fam = board["family"]
    restricted = (f" (restricted at report time to {', '.join(fam['restricted']['methods'])} vs "
                  f"{board['baseline']}, from the declared {', '.join(fam['restricted']['declared'])}: protocol §7's "
                  "fallback family)") if fam.get("restricted") else ""
    not_run = (f" ({len(fam['not_run'])} of them not run by design, counted as p = 1: {', '.join(fam['not_run'])})"
               if fam.get("not_run") else "")
    return (plans[0].upper() + plans[1:] + f"; primary family{' over all of them' if len(sources) > 1 else ''}: "
            f"{fam['size']} comparisons{not_run}{restricted}, Holm-adjusted, alpha {board['alpha']}.{part}")


def _blocks(board: dict, figures: dict[str, bytes], markdown: bool) -> list:
    from .stats import SIGNATURE

    blocks: list = [Heading(f"Benchmark leaderboard: {board['plan_name']}", 1), Para(provenance(board))]
    verdicts = [r["verdict"]["text"] for r in board["rows"] if r.get("verdict") and r["verdict"]["adjusted"]]
    if verdicts:
        from .power import design_power, design_power_text

        blocks += [Heading("Verdicts on the primary endpoint"), *[Para("- " + t) for t in verdicts]]
        blocks += [Para("- " + design_power_text(res)) for res in design_power(board)]
    for task, strength, split in cells(board):
        blocks += [Heading(f"{task}, S = {strength:g}, {split} split"), cell_table(board, task, strength, split)]
        rows = cell_rows(board, task, strength, split)
        h2h = [r for r in rows if r.get("vs_focus")]
        if h2h:
            f, m = h2h[0]["vs_focus"]["focus"], h2h[0]["vs_focus"]["metric"]
            blocks.append(Table([f"{f} vs", "seeds", f"gap reduction of {f} ({m}, points)", "p (unadjusted, secondary)",
                                 f"overall {m}: {f} − other"],
                                [[r["method"], len(r["vs_focus"]["seeds"]),
                                  _v({"value": None if r["vs_focus"]["signed_gap"]["value"] is None
                                      else -r["vs_focus"]["signed_gap"]["value"],
                                      "ci": _neg(r["vs_focus"]["signed_gap"]["ci"])}),
                                  _p(r["vs_focus"]["signed_gap"]["p_value"]), _v(r["vs_focus"]["overall"])] for r in h2h]))
        metrics = [m for m in rows[0]["metrics"] if m not in (rows[0]["primary_metric"], SIGNATURE)]
        if metrics:
            adv, dis = rows[0]["direction"]["advantaged"], rows[0]["direction"]["disadvantaged"]
            blocks.append(Table(["method"] + [f"{m} {q}" for m in metrics for q in ("overall", f"gap {adv}−{dis}")],
                                [[r["method"]] + [c for m in metrics for c in (_v(r["metrics"][m]["overall"]),
                                                                                _v(r["metrics"][m]["signed_gap"]))]
                                 for r in rows]))
    for name, png in figures.items():
        blocks.append(Para(f"![{name}]({name}.png)") if markdown else Figure(name, png))
    if board.get("selection"):
        blocks.append(Heading("Selection (pre-declared rule)"))
        for task, entries in board["selection"].items():
            blocks.append(Table(["task", "method", "chosen trial", "settings", "why"],
                                [[task, e, s["chosen"] or "–", json.dumps(s.get("settings"), sort_keys=True)
                                  if s.get("settings") is not None else "–", s["reason"]] for e, s in entries.items()]))
    if board["corrupt"]:
        blocks += [Heading("Corrupt run folders (left out)"),
                   Table(["path", "reason"], [[c["path"], c["reason"]] for c in board["corrupt"]])]
    blocks += [Heading("Definitions"), Para(
        "Values in percent, pooled over seeds (mean of per-seed values); 95 % CIs and p-values from a random-effects "
        "SE (between-seed variance + each seed's patient-level bootstrap variance, stratified by group), normal "
        "reference. Signed gap = advantaged − disadvantaged group (for the false-positive rate: disadvantaged − "
        "advantaged), so > 0 means the minority is worse off; p (gap = 0) two-sided. Gap reduction = gap(baseline) − "
        "gap(method) on the same test samples (fairllava.fairness.pool_paired: paired bootstrap and per-patient swap "
        "permutation per seed, random-effects pooling), two-sided p, Holm-adjusted over the primary family. ES = "
        "overall / (1 + |gap|). FPR = share of test cases without the shortcut label answered with it. Probe: "
        "balanced accuracy of a linear probe of the attribute within each label (chance 50).")]
    return blocks


def figures(board: dict) -> dict[str, bytes]:
    """One PNG per task: signed gap of the primary metric with its CI, per method and strength."""
    from ..report.figures import _plt, _png

    plt = _plt()
    out = {}
    for task in dict.fromkeys(r["task"] for r in board["rows"]):
        cs = [c for c in cells(board) if c[0] == task]
        fig, axes = plt.subplots(1, len(cs), figsize=(4.2 * len(cs), 0.45 * max(4, len(cell_rows(board, *cs[0]))) + 1.2),
                                 squeeze=False)
        for ax, (t, s, split) in zip(axes[0], cs):
            rows = cell_rows(board, t, s, split)
            m = rows[0]["primary_metric"]
            vals = [r["metrics"][m]["signed_gap"] for r in rows]
            y = list(range(len(rows)))[::-1]
            x = [v["value"] if v["value"] is not None else float("nan") for v in vals]
            lo = [max(0.0, xi - v["ci"][0]) if v["ci"] else 0.0 for xi, v in zip(x, vals)]
            hi = [max(0.0, v["ci"][1] - xi) if v["ci"] else 0.0 for xi, v in zip(x, vals)]
            ax.errorbar(x, y, xerr=[lo, hi], fmt="o", capsize=3)
            ax.axvline(0, color="grey", ls="--", lw=1)
            ax.set_yticks(y, [r["method"] for r in rows])
            ax.set_title(f"{t}, S = {s:g} ({split})", fontsize=9)
            ax.set_xlabel(f"signed {m} gap (points)")
        out[f"leaderboard_{task}"] = _png(fig)
    return out


def csv_text(board: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "strength", "split", "method", "seeds", "metric", "overall", "overall_lo", "overall_hi",
                "advantaged", "advantaged_value", "disadvantaged", "disadvantaged_value", "signed_gap", "gap_lo",
                "gap_hi", "gap_p", "es", "effect_vs_baseline", "effect_lo", "effect_hi", "effect_p", "holm_p",
                "verdict", "levelled_down", "in_primary_family", "provisional"])
    for r in board["rows"]:
        adv, dis = r["direction"]["advantaged"], r["direction"]["disadvantaged"]
        for m, c in r["metrics"].items():
            e = (r["vs_baseline"] or {}).get("metrics", {}).get(m, {}).get("signed_gap") if r["vs_baseline"] else None
            ci = lambda d: (d or {}).get("ci") or [None, None]
            primary = m == r["primary_metric"]
            v = r.get("verdict") if primary else None
            w.writerow([r["task"], r["strength"], r["split"], r["method"], " ".join(map(str, r["seeds"])), m,
                        c["overall"]["value"], *ci(c["overall"]), adv, c["groups"][adv]["value"], dis,
                        c["groups"][dis]["value"], c["signed_gap"]["value"], *ci(c["signed_gap"]),
                        c["signed_gap"]["p_value"], c["es"]["value"], None if e is None else e["value"], *ci(e),
                        None if e is None else e["p_value"], r.get("holm_p") if primary else None,
                        v["label"] if v else None, v["levelled_down"] if v else None,
                        v["adjusted"] if v else None, v["provisional"] if v else None])
    return buf.getvalue()


def write_leaderboard(board: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the four files (+ one PNG per task) into ``out_dir``; ``leaderboard.json`` last."""
    from ..report.html import render_html
    from ..report.markdown import render_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(board) if board["rows"] else {}
    for name, png in figs.items():
        with atomic_path(out / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    atomic_write_text(out / "leaderboard.md", render_markdown(_blocks(board, figs, markdown=True)))
    atomic_write_text(out / "leaderboard.html", render_html(_blocks(board, figs, markdown=False),
                                                            f"Benchmark leaderboard: {board['plan_name']}"))
    atomic_write_text(out / "leaderboard.csv", csv_text(board))
    atomic_write_json(out / "leaderboard.json", board)
    return {f: out / f for f in FILES}


def read_leaderboard(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "leaderboard.json").read_text(encoding="utf-8"))
