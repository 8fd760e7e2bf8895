"""Data order: epoch ``e`` is a permutation seeded by ``(seed, e)``; optimizer step ``s`` consumes micro-batches
``s*ga .. s*ga+ga-1`` of the concatenated epochs, so the step counter alone is the data position (exact resume)."""
from __future__ import annotations

import math

import torch

from ..errors import FairllavaError
from ..io import stable_hash
from .config import TrainConfig


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's micro-batches of epoch ``epoch``: a seeded permutation, padded cyclically to whole global batches."""
    if n < 1:
        raise FairllavaError("training set is empty")
    g = torch.Generator().manual_seed(stable_hash("epoch", seed, epoch) % (2**63 - 1))
    perm = torch.randperm(n, generator=g).tolist()
    global_b = batch_size * world_size
    n_batches = max(1, math.ceil(n / global_b))
    need = n_batches * global_b
    perm = (perm * (need // n + 1))[:need]
    return [perm[(b * world_size + rank) * batch_size:(b * world_size + rank + 1) * batch_size] for b in range(n_batches)]


class _Batches:
    """Micro-batch ``k`` (global index over epochs) -> list of dataset indices, cached per epoch."""

    def __init__(self, n: int, cfg: TrainConfig, rank: int, world: int, balanced=None) -> None:
        self.n, self.cfg, self.rank, self.world, self.balanced = n, cfg, rank, world, balanced
        self._epoch, self._cache = -1, []
        self.per_epoch = len(self._epoch_list(0))

    def _epoch_list(self, epoch: int) -> list[list[int]]:
        if self.balanced is not None:
            self.balanced.set_epoch(epoch)
            return [list(b) for b in self.balanced]
        o = self.cfg.optim
        return epoch_batches(self.n, o.per_device_batch_size, o.seed, epoch, self.rank, self.world)

    def __getitem__(self, k: int) -> tuple[int, list[int]]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._cache = epoch, self._epoch_list(epoch)
        return epoch, self._cache[pos]


def _as_is(item):
    return item  # the view already collates; a module-level function so spawn-started workers can pickle it


class _Collated(torch.utils.data.Dataset):
    """Map-style view for a DataLoader: item ``(epoch, indices)`` -> ``(epoch, collated batch)``."""

    def __init__(self, dataset, index_map, collator) -> None:
        self.dataset, self.index_map, self.collator = dataset, index_map, collator

    def __getitem__(self, item: tuple[int, list[int]]) -> tuple[int, dict]:
        epoch, local = item
        return epoch, self.collator([self.dataset[self.index_map[i]] for i in local])


class BatchLoader:
    """Micro-batch ``k`` -> ``(epoch, collated CPU batch)``, the same batches in the same order for any
    ``num_workers`` (``data.num_workers``).

    Why: with ``num_workers > 0`` images are read and collated in worker processes (torch's DataLoader,
    prefetching), so a GPU does not wait on JPEG decoding; the batch *order* stays the main process's
    (:class:`_Batches`), so resume and determinism do not depend on the worker count. Requests are expected to be
    consecutive; any other request restarts the prefetch at that micro-batch (e.g. the main loop after an
    adversary's pre-training)."""

    def __init__(self, batches: _Batches, dataset, index_map, collator, num_workers: int = 0, limit: int = 0,
                 pin_memory: bool = False) -> None:
        self.batches, self.num_workers, self.limit, self.pin_memory = batches, int(num_workers), int(limit), pin_memory
        self.view = _Collated(dataset, index_map, collator)
        self._it, self._next = None, None

    def __call__(self, k: int) -> tuple[int, dict]:
        if self.num_workers <= 0 or k >= self.limit:  # beyond ``limit`` (a longer adversary pre-training): here
            return self.view[self.batches[k]]
        if self._it is None or k != self._next:
            self._it = None  # free the old workers before starting new ones
            self._start(k)
        self._next = k + 1
        return next(self._it)

    def _start(self, k: int) -> None:
        order = [self.batches[j] for j in range(k, self.limit)]
        # Its own generator: an iterator seeds its workers from the loader's generator, which would otherwise be
        # the global one and shift every later random draw (dropout masks, token sampling) by the worker count.
        loader = torch.utils.data.DataLoader(self.view, batch_size=None, sampler=order, num_workers=self.num_workers,
                                             pin_memory=self.pin_memory, collate_fn=_as_is,
                                             generator=torch.Generator().manual_seed(0))
        self._it = iter(loader)

    def close(self) -> None:
        self._it = None
