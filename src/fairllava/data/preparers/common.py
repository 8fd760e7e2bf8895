"""Shared preparer machinery: grouped splits, drop accounting, datacards and atomic output folders.

Why: every preparer must give the same guarantees — a split unit (patient / lesion / report) never in
two splits, every dropped row counted with its reason, and an output folder that either appears
complete (``train/val/test.jsonl`` + ``datacard.json``) or not at all.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ...errors import FairllavaError
from ...io import atomic_dir, atomic_write_json, enumerate_jsonl, stable_hash
from ..schema import check_record

SPLITS = ("train", "val", "test")
IMAGE_PROMPT_PREFIX = "<image>\n"
# Prompts of the reference (EVALUATION.md §2.1), used for MIMIC-CXR, PadChest and IU X-ray.
PROMPT_WITH_INDICATION = (
    "Provide a description of the findings in the radiology image given the following indication: {reason}"
)
PROMPT_WITHOUT_INDICATION = "Provide a description of the findings in the radiology image."
FRONTAL_VIEWS = ("AP", "PA")
DATACARD_VERSION = 1


def findings_prompt(reason: str | None, use_indication: bool = True) -> str:
    """The human turn (image placeholder, newline, prompt)."""
    if use_indication and reason is not None and str(reason).strip():
        return IMAGE_PROMPT_PREFIX + PROMPT_WITH_INDICATION.format(reason=" ".join(str(reason).split()))
    return IMAGE_PROMPT_PREFIX + PROMPT_WITHOUT_INDICATION


def conversation(human: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


def check_fractions(val_frac: float, test_frac: float) -> tuple[float, float, float]:
    for name, f in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 <= f < 1:
            raise FairllavaError(f"--{name.replace('_', '-')} {f}: expected a fraction in [0, 1)")
    if val_frac + test_frac >= 1:
        raise FairllavaError(f"--val-frac + --test-frac = {val_frac + test_frac}: must leave a training split")
    return 1 - val_frac - test_frac, val_frac, test_frac


def hash_split(group_id: str, seed: int, val_frac: float, test_frac: float) -> str:
    """Streaming grouped split: the split of a group is a pure function of (seed, group_id).

    Used where the groups are too many to hold (MIMIC-CXR); proportions are exact in expectation.
    """
    u = (stable_hash("split", seed, group_id) % 1_000_000_007) / 1_000_000_007
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "val"
    return "train"


def grouped_split(
    groups: Sequence[str],
    seed: int,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    strata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign each distinct group to a split with seeded shuffling (exact proportions of *groups*).

    With ``strata`` (group -> stratum, e.g. HAM10000 ``dx``) each stratum is split separately so the
    label mix is preserved. The result depends only on the set of groups, the seed and the strata.
    """
    check_fractions(val_frac, test_frac)
    uniq = sorted(set(groups))
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g in uniq:
        by_stratum[strata[g] if strata is not None else ""].append(g)
    out: dict[str, str] = {}
    for stratum in sorted(by_stratum):
        members = by_stratum[stratum]
        rng = np.random.default_rng([seed, stable_hash("stratum", stratum) % (2**32)])
        perm = [members[i] for i in rng.permutation(len(members))]
        n = len(perm)
        n_test = int(round(n * test_frac))
        n_val = int(round(n * val_frac))
        if n - n_test - n_val < 0:
            n_val = max(0, n - n_test)
        for i, g in enumerate(perm):
            out[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def source_info(path: str | os.PathLike | None) -> dict | None:
    """What the datacard records about an input file (name and size; never its content)."""
    if path is None:
        return None
    p = Path(path)
    return {"name": p.name, "bytes": p.stat().st_size if p.exists() else None}


@dataclass
class DataCard:
    """Counts per split and attribute group, dropped rows with reasons, bins and sources."""

    dataset: str
    args: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    bins: dict = field(default_factory=dict)
    attributes: list = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    groups_per_split: dict = field(default_factory=lambda: {s: set() for s in SPLITS})
    group_counts: dict = field(default_factory=lambda: {s: defaultdict(Counter) for s in SPLITS})
    extra: dict = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def add(self, split: str, rec: dict) -> None:
        self.counts[split] += 1
        self.groups_per_split[split].add(rec["group_id"])
        for a in self.attributes:
            v = rec["attributes"].get(a)
            self.group_counts[split][a]["null" if v is None else v] += 1

    def to_dict(self) -> dict:
        return {
            "version": DATACARD_VERSION,
            "dataset": self.dataset,
            "args": self.args,
            "sources": self.sources,
            "bins": self.bins,
            "attributes": list(self.attributes),
            "splits": {
                s: {
                    "records": self.counts[s],
                    "groups": len(self.groups_per_split[s]),
                    "attributes": {a: dict(sorted(self.group_counts[s][a].items())) for a in self.attributes},
                }
                for s in SPLITS
            },
            "total_records": sum(self.counts.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "total_dropped": sum(self.dropped.values()),
            "notes": list(self.notes),
            **self.extra,
        }


class SplitWriter:
    """Validates and streams records into ``<tmp>/{train,val,test}.jsonl`` inside an atomic folder."""

    def __init__(self, folder: Path, card: DataCard) -> None:
        self.folder = folder
        self.card = card
        self._files: dict[str, IO[str]] = {s: open(folder / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        self._ids: set[str] = set()
        self._group_split: dict[str, str] = {}

    def write(self, split: str, rec: dict) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        check_record(rec, f"{self.card.dataset} output", require_group_id=True)
        if rec["id"] in self._ids:
            raise FairllavaError(f"{self.card.dataset}: duplicate output id {rec['id']!r} (ids must be unique)")
        first = self._group_split.setdefault(rec["group_id"], split)
        if first != split:  # a bug guard: preparers assign splits per group
            raise RuntimeError(f"group {rec['group_id']!r} assigned to both {first} and {split}")
        self._ids.add(rec["id"])
        self._files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.card.add(split, rec)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


@contextmanager
def prepared_output(out_dir: str | os.PathLike, card: DataCard, overwrite: bool = False) -> Iterator[SplitWriter]:
    """Yield a :class:`SplitWriter` over a temp folder; on success write ``datacard.json`` and rename
    the folder to ``out_dir``. Any error leaves no output (and an existing ``out_dir`` untouched)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FairllavaError(f"{out}: exists and is not a directory")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = SplitWriter(tmp, card)
        try:
            yield writer
        finally:
            writer.close()
        if sum(card.counts.values()) == 0:
            raise FairllavaError(f"{card.dataset}: no records left after filtering (dropped: {dict(card.dropped)})")
        atomic_write_json(tmp / "datacard.json", card.to_dict())


def require_columns(columns: Iterable[str], needed: Iterable[str], where: str) -> None:
    cols = set(columns)
    missing = [c for c in needed if c not in cols]
    if missing:
        raise FairllavaError(f"{where}: missing column(s) {', '.join(missing)} (found {', '.join(sorted(cols)[:20])})")


def read_csv_checked(path: str | os.PathLike, usecols: Sequence[str] | None = None, needed: Sequence[str] = (),
                     **kwargs: Any):
    """pandas.read_csv with a located error for missing files/columns (``.gz`` handled by pandas)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FairllavaError(f"{p}: file not found")
    try:
        header = pd.read_csv(p, nrows=0)
    except Exception as e:
        raise FairllavaError(f"{p}: cannot read CSV ({type(e).__name__}: {e})") from None
    require_columns(header.columns, needed, str(p))
    cols = [c for c in (usecols or header.columns) if c in set(header.columns)]
    try:
        return pd.read_csv(p, usecols=cols, **kwargs)
    except Exception as e:
        raise FairllavaError(f"{p}: cannot read CSV ({type(e).__name__}: {e})") from None


def iter_json_records(path: str | os.PathLike, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Stream the objects of a top-level JSON array *or* a JSONL file in bounded memory.

    Yields ``(index, obj)`` (array position, or line number for JSONL); a syntax error raises
    ``FairllavaError('file:line: invalid JSON ...')``. Memory is a few chunks, not the file size.
    """
    p = Path(path)
    if not p.is_file():
        raise FairllavaError(f"{p}: file not found")
    dec = json.JSONDecoder()
    max_pending = 64 * chunk_chars  # one object larger than this is treated as malformed
    with open(p, encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        if not buf.strip():
            raise FairllavaError(f"{p}: empty file")
        if buf.lstrip()[0] != "[":
            f.seek(0)
            yield from enumerate_jsonl(p)
            return
        base_line = 0  # newlines in text already discarded from the buffer
        pos = buf.index("[") + 1
        eof = False
        idx = 0
        need_comma = False
        while True:
            while True:  # skip whitespace and one separating comma, refilling as needed
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) and need_comma and buf[pos] == ",":
                    need_comma = False
                    pos += 1
                    continue
                if pos < len(buf) or eof:
                    break
                base_line += buf.count("\n")
                buf, pos = f.read(chunk_chars), 0
                eof = not buf
            if pos >= len(buf):
                raise FairllavaError(f"{p}:{base_line + 1}: truncated JSON array (no closing ])")
            if buf[pos] == "]":
                return
            if need_comma:
                line = base_line + buf.count("\n", 0, pos) + 1
                raise FairllavaError(f"{p}:{line}: invalid JSON (expected ',' or ']' between array items)")
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    more = "" if eof or len(buf) - pos > max_pending else f.read(chunk_chars)
                    if not more:
                        line = base_line + buf.count("\n", 0, e.pos) + 1
                        raise FairllavaError(f"{p}:{line}: invalid JSON ({e.msg})") from None
                    base_line += buf.count("\n", 0, pos)
                    buf, pos = buf[pos:] + more, 0
            yield idx, obj
            idx += 1
            need_comma = True
            pos = end
            if pos > chunk_chars:
                base_line += buf.count("\n", 0, pos)
                buf, pos = buf[pos:], 0





class _NullProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def progress_bar(enabled: bool):
    """A transient rich progress (stderr) or a no-op context; yields the Progress or None."""
    if not enabled:
        return _NullProgress()
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}: {task.completed} rows"),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)
