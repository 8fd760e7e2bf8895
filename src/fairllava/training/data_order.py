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
