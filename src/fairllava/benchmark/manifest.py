"""Completion markers with content hashes, and the code version a results folder was made with.

Why: a sweep runs for hours across sessions and may be killed at any point. A step is *finished* only when
its ``DONE.json`` exists; that file is written atomically, last, and lists the SHA-256 of every file in the
step's folder, so a folder whose files were changed, truncated or deleted afterwards is detected (reported
by path and re-run), never aggregated.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

from ..io import atomic_write_json

DONE = "DONE.json"
#: Package parts that only format or display results: changing them does not invalidate finished runs.
NOT_RESULT_CODE = ("cli", "report", "benchmark/leaderboard.py", "benchmark/report.py", "benchmark/stats.py",
                   "benchmark/power.py", "benchmark/freeze.py",
                   "benchmark/verdict.py", "progress.py", "demo.py")

#: Files a finished step may lose and stay finished (state "pruned"), by step kind: a finished run's weights
#: and its audit's feature cache, which no later result reads, and bulky inputs that their step rebuilds bit for bit when a later step needs
#: them (the runner checks the rebuilt hashes against the recorded ones). Why: a sweep spans sessions on fresh
#: machines, so its folder is committed as it grows (SWEEP_GITIGNORE), and these files do not belong in git.
PRUNABLE = {"run": ("train/*.safetensors", "audit/features/*"), "data": ("shortcut/images/*",), "base": ("model/*",)}
#: Written into every results folder: git leaves out the prunable files and what no result needs.
SWEEP_GITIGNORE = """# A sweep folder is committed as it grows (docs/benchmark.md). Left out: what a finished step may lose
# (manifest.PRUNABLE: run weights and the audit's cached features, ~3 MB a run, which only its audit.json
# summarises; rendered images and a saved base, rebuilt and checked bit for bit when needed) and what no result
# reads (worker logs, training checkpoints).
runs/**/train/*.safetensors
runs/**/audit/features/
data/**/shortcut/images/
base/**/model/
/logs/
**/checkpoints/
# leftovers of interrupted atomic writes (never hashed), and partial files of an unfinished step
.*.tmp
.*.old
*.partial
"""

_CODE: Optional[dict] = None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _leftover(part: str) -> bool:
    """A temp or displaced folder/file of an interrupted atomic write (io.atomic_path / atomic_dir)."""
    return part.startswith(".") and part.endswith((".tmp", ".old"))


def folder_hashes(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``folder`` except the marker itself and the leftovers of
    interrupted writes (which a kill can leave beside a step's real files)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.name != DONE and "__pycache__" not in rel.parts and not any(map(_leftover, rel.parts)):
            out[rel.as_posix()] = file_sha256(p)
    return out


def write_done(folder: Path, info: dict) -> dict:
    """Hash the folder's files and write ``DONE.json`` atomically (the step is finished from here on)."""
    marker = {**info, "files": folder_hashes(folder)}
    atomic_write_json(folder / DONE, marker)
    return marker


def check_done(folder: Path, prunable: tuple[str, ...] = ()) -> tuple[str, str]:
    """``("missing" | "incomplete" | "ok" | "pruned" | "corrupt", reason)`` for a step folder. "pruned": finished,
    and every file it lacks matches one of ``prunable`` (PRUNABLE of its kind); every file it has is intact."""
    marker = folder / DONE
    if not marker.is_file():
        return ("incomplete", "no DONE.json") if folder.exists() else ("missing", "")
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return "corrupt", f"{marker.name} is unreadable"
    pruned = 0
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            if any(fnmatch.fnmatchcase(rel, pat) for pat in prunable):
                pruned += 1
                continue
            return "corrupt", f"{rel} is missing"
        if file_sha256(p) != digest:
            return "corrupt", f"{rel} changed after the run finished"
    return ("pruned", f"{pruned} prunable file(s) left out") if pruned else ("ok", "")


def finished(state: str) -> bool:
    return state in ("ok", "pruned")


def read_done(folder: Path) -> dict:
    return json.loads((folder / DONE).read_text(encoding="utf-8"))


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def code_version() -> dict:
    """The code that makes results: a hash of the package's source (minus display-only parts) and the git
    commit that last changed it. Why a hash and not HEAD: committing a partial leaderboard moves HEAD but
    changes no result, while an uncommitted edit of the trainer changes results but not HEAD."""
    global _CODE
    if _CODE is None:
        import fairllava

        root = Path(fairllava.__file__).resolve().parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if not p.is_file() or p.suffix not in (".py", ".yaml", ".json") or "__pycache__" in rel:
                continue
            if any(rel == x or rel.startswith(x + "/") for x in NOT_RESULT_CODE):
                continue
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
        status = _git(root, "status", "--porcelain", "--", ".")
        _CODE = {"code_hash": h.hexdigest()[:16], "commit": _git(root, "log", "-1", "--format=%H", "--", "."),
                 "head": _git(root, "rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
                 "package_version": getattr(fairllava, "__version__", None)}
    return dict(_CODE)


def threads_env(threads: int) -> dict:
    """Environment for a worker process that must use ``threads`` CPU threads."""
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
