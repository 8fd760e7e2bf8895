"""Samplers and weights for the Resampling-All / Reweighting-All baselines and efficient batching.

Why: the reference defined an attribute-balanced sampler but never wired it in and had no
reweighting code (METHOD.md §12 #11). These are the exact METHOD.md §10 definitions, deterministic
given ``seed`` and the epoch, and distributed-aware (every rank sees the same number of batches).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import FairllavaError
from .attributes import IGNORE_INDEX, AttributeVocab, is_missing

DEFAULT_ORDER = ("age_group", "race", "sex")


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"sampler: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


class AttributeBalancedBatchSampler(Sampler[list[int]]):
    """Resampling-All (METHOD.md §10): batch ``t`` balances attribute ``order[t mod n_attr]``.

    For that attribute's ``K`` groups (classes with at least one sample), each global batch draws
    ``floor(B/K)`` samples per group plus one extra for ``B mod K`` groups picked at random. Each group
    is a shuffled list consumed cyclically and reshuffled when exhausted. Samples whose label for the
    balanced attribute is missing (``IGNORE_INDEX``) are not drawn for that batch. One epoch is
    ``N // (B * world_size)`` batches per rank (at least 1). The global batch (``B * world_size``) is
    interleaved over groups and rank ``r`` takes every ``world_size``-th element, so each rank's share
    is itself balanced. Call :meth:`set_epoch` each epoch; the order is a pure function of
    ``(seed, epoch)``.

    ``labels``: ``{attribute: per-sample class ids}`` (e.g. ``VLMDataset.attr_ids`` transposed, see
    :meth:`from_dataset`).
    """

    def __init__(
        self,
        labels: Mapping[str, Sequence[int]],
        batch_size: int,
        order: Sequence[str] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_batches: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not labels:
            raise ValueError("AttributeBalancedBatchSampler: needs at least one attribute")
        if order is None:
            order = [a for a in DEFAULT_ORDER if a in labels] + [a for a in labels if a not in DEFAULT_ORDER]
        order = list(dict.fromkeys(order))
        unknown = [a for a in order if a not in labels]
        if unknown:
            raise ValueError(f"order: attribute(s) {unknown} have no labels (have {sorted(labels)})")
        lens = {len(v) for v in labels.values()}
        if len(lens) != 1:
            raise ValueError(f"labels: attributes have different lengths {sorted(lens)}")
        self.n = lens.pop()
        self.batch_size = int(batch_size)
        self.order = order
        self.seed = int(seed)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.epoch = 0
        self.groups: dict[str, dict[int, np.ndarray]] = {}
        for a in order:
            arr = np.asarray(labels[a], dtype=np.int64)
            classes = sorted(int(c) for c in np.unique(arr) if c != IGNORE_INDEX)
            if not classes:
                raise FairllavaError(f"resample: attribute {a!r} has no labelled samples")
            self.groups[a] = {c: np.flatnonzero(arr == c) for c in classes}
        global_b = self.batch_size * self.world_size
        self._len = int(num_batches) if num_batches is not None else max(1, self.n // global_b)

    @classmethod
    def from_dataset(cls, dataset, batch_size: int, **kwargs) -> "AttributeBalancedBatchSampler":
        """Use a :class:`VLMDataset`'s encoded attributes (``attr_ids``)."""
        names = list(dataset.vocabs)
        labels = {a: [ids[a] for ids in dataset.attr_ids] for a in names}
        return cls(labels, batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        # per attribute, per group: a shuffled list and a cursor
        state = {a: {c: [rng.permutation(idx), 0] for c, idx in g.items()} for a, g in self.groups.items()}
        global_b = self.batch_size * self.world_size
        for t in range(self._len):
            a = self.order[t % len(self.order)]
            groups = state[a]
            keys = list(groups)
            k = len(keys)
            base, rem = divmod(global_b, k)
            counts = dict.fromkeys(keys, base)
            for j in rng.choice(k, size=rem, replace=False) if rem else []:
                counts[keys[int(j)]] += 1
            per_group: list[list[int]] = []
            for c in keys:
                per_group.append(self._draw(groups[c], counts[c], rng))
            # interleave over groups so every rank slice is balanced too
            flat: list[int] = []
            depth = max((len(p) for p in per_group), default=0)
            for d in range(depth):
                for p in per_group:
                    if d < len(p):
                        flat.append(p[d])
            yield flat[self.rank :: self.world_size]

    @staticmethod
    def _draw(slot: list, n: int, rng: np.random.Generator) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            perm, pos = slot
            take = min(n - len(out), len(perm) - pos)
            out.extend(int(i) for i in perm[pos : pos + take])
            pos += take
            if pos >= len(perm):
                perm, pos = rng.permutation(perm), 0
            slot[0], slot[1] = perm, pos
        return out


class LengthGroupedSampler(Sampler[int]):
    """Seeded length-grouped order (HF's ``get_length_grouped_indices``: random mega-batches, each sorted
    by length) so padded batches waste little compute; sharded by rank with equal counts per rank."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        mega_batch_mult: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.lengths = [int(x) for x in lengths]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self.num_samples = math.ceil(len(self.lengths) / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        idx = get_length_grouped_indices(self.lengths, self.batch_size * self.world_size, self.mega_batch_mult, g)
        total = self.num_samples * self.world_size
        idx = idx + idx[: total - len(idx)]  # pad by wrapping so every rank has the same count
        # contiguous global batches of B*world_size, rank r takes its own block of B from each
        out = []
        gb = self.batch_size * self.world_size
        for s in range(0, total, gb):
            block = idx[s : s + gb]
            per = math.ceil(len(block) / self.world_size)
            out.extend(block[self.rank * per : (self.rank + 1) * per])
        return iter(out[: self.num_samples])


def _attr_value(rec: dict, name: str, vocab: AttributeVocab | None) -> str | None:
    v = (rec.get("attributes") or {}).get(name)
    if vocab is not None:
        return vocab.normalize(v)
    return None if is_missing(v) else str(v)


def reweight_weights(
    records: Iterable[dict],
    attributes: Sequence[str],
    mode: Literal["intersectional", "product"] = "intersectional",
    clip: tuple[float, float] = (0.1, 10.0),
    vocabs: Mapping[str, AttributeVocab] | None = None,
) -> dict[str, float]:
    """Reweighting-All (METHOD.md §10): per-sample weight by sample id.

    ``intersectional``: ``1 / n(cell)`` of the sample's cell over all ``attributes``; ``product``:
    ``prod_a 1 / n_a(value)``. A missing value is its own level (so unlabelled samples are neither
    up- nor down-weighted by the labelled groups' sizes). Weights are normalised to mean 1 over the
    records, then clipped to ``clip``.
    """
    if mode not in ("intersectional", "product"):
        raise ValueError(f"reweight mode: expected intersectional|product, got {mode!r}")
    lo, hi = clip
    if not 0 < lo <= hi:
        raise ValueError(f"reweight clip: expected 0 < min <= max, got {clip}")
    attributes = list(dict.fromkeys(attributes))
    if not attributes:
        raise ValueError("reweight: needs at least one attribute")
    vocabs = {k: v.copy() for k, v in (vocabs or {}).items()}
    ids: list[str] = []
    cells: list[tuple] = []
    for rec in records:
        rid = str(rec["id"])
        ids.append(rid)
        cells.append(tuple(_attr_value(rec, a, vocabs.get(a)) for a in attributes))
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise FairllavaError(f"reweight: duplicate sample id {dup!r}")
    if not ids:
        return {}
    if mode == "intersectional":
        freq = Counter(cells)
        raw = np.array([1.0 / freq[c] for c in cells])
    else:
        per_attr = [Counter(c[j] for c in cells) for j in range(len(attributes))]
        raw = np.array([np.prod([1.0 / per_attr[j][c[j]] for j in range(len(attributes))]) for c in cells])
    w = np.clip(raw / raw.mean(), lo, hi)
    return {i: float(x) for i, x in zip(ids, w)}
