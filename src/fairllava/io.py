"""Small I/O helpers shared by every module: atomic writes, JSONL with located errors, stable hashing.

Why: a kill must never leave a file that looks complete but is not, and every bad row must be
reported as ``file:line (id=...)`` so users can fix their data.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import FairllavaError


def stable_hash(*parts: Any) -> int:
    """A process-independent 63-bit integer hash (Python's ``hash()`` is salted per process)."""
    joined = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(joined).digest()[:8], "big") >> 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path in the same folder; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FairllavaError(f"{path}: already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", overwrite)


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict], overwrite: bool = True) -> int:
    n = 0
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
                n += 1
    return n


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place when complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FairllavaError(f"{path}: already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets the usual permissions
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict]:
    """Read a JSONL file; a bad line raises ``FairllavaError('file:line: ...')``."""
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> Iterator[dict]:
    required = tuple(required)
    for lineno, row in enumerate_jsonl(path):
        if not isinstance(row, dict):
            raise FairllavaError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            rid = row.get("id", "?")
            raise FairllavaError(f"{path}:{lineno} (id={rid}): missing field(s) {', '.join(missing)}")
        yield row


def enumerate_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line; invalid JSON raises ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FairllavaError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise FairllavaError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
