"""Whole-file validation of sample JSONL (``fairllava validate``).

Why: a training run that dies on row 180,000 of a bad file wastes hours; validation reports *every*
problem at once, one line each as ``file:line (id=...): problem``, plus the group counts per attribute
so a user sees empty or tiny groups before training.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Sequence

from ..errors import FairllavaError
from .attributes import PRESETS, AttributeVocab, make_preset
from .dataset import resolve_image_path
from .schema import record_problems

ImageCheck = Literal["verify", "load", "exists", "none"]
MISSING_GROUP = "<missing>"

# Default vocabularies used when an attribute has that name and no --vocab was given.
DEFAULT_PRESET_FOR = {"sex": "sex", "gender": "sex", "age_group": "age_group", "race": "race8"}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    id: str | None
    message: str

    def __str__(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{loc} (id={self.id if self.id is not None else '?'}): {self.message}"


class ValidationResult(list):
    """The problems (a ``list[Problem]``, as in DESIGN.md) plus record/file counts and group counts."""

    def __init__(self, n_files: int = 0) -> None:
        super().__init__()
        self.n_records = 0
        self.n_files = n_files
        self.groups: dict[str, Counter] = {}  # attribute -> value -> count

    @property
    def problems(self) -> list[Problem]:
        return list(self)

    @property
    def ok(self) -> bool:
        return not self


def _check_image(root: Path, rel: str, mode: ImageCheck) -> str | None:
    try:
        full = resolve_image_path(root, rel)
    except FairllavaError:
        return f"image path {rel!r} escapes the image root"
    if mode == "none":
        return None
    if not full.is_file():
        return f"image not found: {rel}"
    if mode == "exists":
        return None
    from PIL import Image

    try:
        with Image.open(full) as im:
            if mode == "verify":
                im.verify()
            else:
                im.load()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"image does not decode: {rel} ({type(e).__name__}: {e})"
    return None


def validate_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
    vocabs: Mapping[str, AttributeVocab] | None = None,
    *,
    image_check: ImageCheck = "verify",
    require_group_id: bool = False,
    on_record: Callable[[], None] | None = None,
) -> ValidationResult:
    """Validate one or more JSONL files; never raises on data problems (they are collected).

    Checks: JSON syntax, schema (:mod:`.schema`), ``<image>`` count vs image, image exists / decodes,
    path escapes the root, attribute values known to their vocabulary (``vocabs``; standard names get
    the preset vocabularies), duplicate ids (across all files), and a ``group_id`` in two files
    (a split leak). Missing files raise :class:`FairllavaError`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FairllavaError(f"{p}: file not found")
    if image_check not in ("verify", "load", "exists", "none"):
        raise ValueError(f"image_check: expected verify|load|exists|none, got {image_check!r}")
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise FairllavaError(f"{root}: image root is not a directory")
    vocabs = {k: v.copy() for k, v in (vocabs or {}).items()}
    res = ValidationResult(n_files=len(paths))
    seen_ids: dict[str, str] = {}
    group_file: dict[str, str] = {}

    def add(file: Path, line: int | None, rid, msg: str) -> None:
        res.append(Problem(str(file), line, None if rid is None else str(rid), msg))

    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                if on_record is not None:
                    on_record()
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as e:
                    add(path, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                res.n_records += 1
                rid = rec.get("id") if isinstance(rec, dict) else None
                for msg in record_problems(rec, require_group_id=require_group_id):
                    add(path, lineno, rid, msg)
                if not isinstance(rec, dict):
                    continue
                if isinstance(rid, str):
                    where = f"{path}:{lineno}"
                    if rid in seen_ids:
                        add(path, lineno, rid, f"duplicate id (first at {seen_ids[rid]})")
                    else:
                        seen_ids[rid] = where
                gid = rec.get("group_id")
                if isinstance(gid, str):
                    first = group_file.setdefault(gid, str(path))
                    if first != str(path):
                        add(path, lineno, rid, f"group_id {gid!r} also appears in {first} (split leak)")
                image = rec.get("image")
                if isinstance(image, str) and image.strip():
                    if root is None:
                        if image_check != "none":
                            add(path, lineno, rid, "record has an image but no image root was given (--images)")
                    else:
                        msg = _check_image(root, image, image_check)
                        if msg:
                            add(path, lineno, rid, msg)
                attrs = rec.get("attributes")
                if isinstance(attrs, dict):
                    _count_attributes(attrs, vocabs, res, lambda m: add(path, lineno, rid, m))
    return res


def _count_attributes(attrs: dict, vocabs: dict[str, AttributeVocab], res: ValidationResult, report) -> None:
    names = list(dict.fromkeys(list(vocabs) + list(attrs)))
    for name in names:
        value = attrs.get(name)
        if name not in vocabs and name in DEFAULT_PRESET_FOR:
            vocabs[name] = make_preset(DEFAULT_PRESET_FOR[name], name=name)
        vocab = vocabs.get(name)
        counter = res.groups.setdefault(name, Counter())
        if value is not None and (isinstance(value, bool) or not isinstance(value, str)):
            continue  # already reported by the schema check
        if vocab is None:
            counter[MISSING_GROUP if value is None or not str(value).strip() else value] += 1
            continue
        try:
            canon = vocab.normalize(value)
        except FairllavaError as e:
            report(str(e))
            continue
        if canon is None:
            key = MISSING_GROUP if value is None or not str(value).strip() else f"{value} (excluded)"
            counter[key] += 1
        else:
            counter[canon] += 1


def problems_to_lines(problems: Iterable[Problem]) -> list[str]:
    return [str(p) for p in problems]


__all__ = ["Problem", "ValidationResult", "validate_dataset", "PRESETS", "MISSING_GROUP"]
