"""A map-style dataset over sample records with lazy image loading.

Why: MIMIC-size sets cannot hold decoded images in memory; records are small, images are opened
per item. Image paths are resolved against one root and must stay inside it, so a record cannot
read arbitrary files (``../../etc/passwd``, absolute paths, symlinks out of the root).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from torch.utils.data import Dataset

from ..errors import FairllavaError
from ..io import enumerate_jsonl, iter_jsonl
from .attributes import AttributeVocab
from .schema import check_record, locate


def resolve_image_path(image_root: str | os.PathLike, rel: str, where: str | None = None, rec_id: Any = None) -> Path:
    """``image_root / rel`` resolved (symlinks followed); error if it leaves the root."""
    root = Path(image_root).resolve()
    p = Path(rel)
    full = (p if p.is_absolute() else root / p).resolve()
    if full != root and root not in full.parents:
        raise FairllavaError(f"{locate(where, rec_id)}: image path {rel!r} escapes the image root {str(root)!r}")
    return full


def load_image(path: Path, where: str | None = None, rec_id: Any = None):
    """Open an image as RGB (PIL); a missing or undecodable file is a located FairllavaError."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FairllavaError(f"{locate(where, rec_id)}: image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise FairllavaError(f"{locate(where, rec_id)}: cannot decode image {path.name}: {e}") from None


class VLMDataset(Dataset):
    """Records (a JSONL path or a list of dicts) -> items for :class:`~fairllava.data.collator.VLMCollator`.

    Each item: ``{"id", "image" (PIL RGB or None), "conversations", "attributes", "attr_ids": {name: int},
    "label", "weight"?}``. ``attr_ids`` uses the vocabularies (missing -> -100); unknown strings raise when
    the dataset is built (not mid-epoch). ``check_unique_ids`` rejects duplicate ids up front.
    """

    def __init__(
        self,
        path_or_records: str | os.PathLike | Sequence[dict] | Iterable[dict],
        image_root: str | os.PathLike | None = None,
        vocabs: Mapping[str, AttributeVocab] | None = None,
        *,
        load_images: bool = True,
    ) -> None:
        self.vocabs = dict(vocabs or {})
        self.image_root = Path(image_root) if image_root is not None else None
        self.load_images = load_images
        self.source = str(path_or_records) if isinstance(path_or_records, (str, os.PathLike)) else "<records>"
        self.records: list[dict] = []
        self._where: list[str] = []
        self.attr_ids: list[dict[str, int]] = []
        seen: dict[str, str] = {}
        if isinstance(path_or_records, (str, os.PathLike)):
            rows = _located_rows(Path(path_or_records))
        else:
            rows = ((f"<records>[{i}]", r) for i, r in enumerate(path_or_records))
        for where, rec in rows:
            check_record(rec, where)
            rid = rec["id"]
            if rid in seen:
                raise FairllavaError(f"{locate(where, rid)}: duplicate id (first at {seen[rid]})")
            seen[rid] = where
            if rec.get("image") is not None and self.image_root is None and load_images:
                raise FairllavaError(f"{locate(where, rid)}: record has an image but no image_root was given")
            ids = {}
            for name, vocab in self.vocabs.items():
                try:
                    ids[name] = vocab.encode(rec["attributes"].get(name))
                except FairllavaError as e:
                    raise FairllavaError(f"{locate(where, rid)}: {e}") from None
            self.records.append(rec)
            self._where.append(where)
            self.attr_ids.append(ids)

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path | None:
        rec = self.records[i]
        if rec.get("image") is None:
            return None
        assert self.image_root is not None
        return resolve_image_path(self.image_root, rec["image"], self._where[i], rec["id"])

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        image = None
        if self.load_images and rec.get("image") is not None:
            image = load_image(self.image_path(i), self._where[i], rec["id"])
        item = {
            "id": rec["id"],
            "image": image,
            "conversations": rec["conversations"],
            "attributes": rec["attributes"],
            "attr_ids": dict(self.attr_ids[i]),
            "label": rec.get("label"),
        }
        if "weight" in rec:
            item["weight"] = float(rec["weight"])
        return item

    @property
    def lengths(self) -> list[int]:
        """Cheap length proxy (characters of all turns) for length-grouped batching."""
        return [sum(len(t["value"]) for t in r["conversations"]) for r in self.records]

    def where(self, i: int) -> str:
        return self._where[i]


def _located_rows(path: Path):
    for lineno, rec in enumerate_jsonl(path):
        yield f"{path}:{lineno}", rec


__all__ = ["VLMDataset", "resolve_image_path", "load_image", "iter_jsonl"]
