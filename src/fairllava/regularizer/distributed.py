"""Cross-rank gathering of pooled states and labels, so CLUB negatives come from the global batch.

Why: with the reference's 6 samples per device the estimate is very noisy (METHOD.md §9.3, §12 #13). The
gather is autograd-aware: in backward, each rank's gradient w.r.t. the gathered tensor is summed over ranks
(all-reduce) and the local slice flows back to the local shard. Every rank computes the same global loss, so
after DDP's gradient averaging the parameters receive exactly d(global loss)/dθ. Ranks may hold different
numbers of rows (token-level pooling); rows are padded for the collective and trimmed afterwards.
Without an initialised process group (or with one rank) everything is a no-op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [int(s) for s in out]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    n_max = max(sizes)
    pad = x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))
    xp = torch.cat([x, pad], dim=0).contiguous()
    out = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(out, xp)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return _gather_padded(x.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ([N_r, ...]) from all ranks in rank order; gradients reach the local shard."""
    if not is_distributed():
        return x
    sizes = _sizes(x.shape[0], x.device)
    if x.requires_grad:
        return _AllGather.apply(x, sizes)
    return _gather_padded(x, sizes)


def all_gather_labels(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather per-row label tensors (no gradient) in the same row order as ``all_gather_with_grad``."""
    if not is_distributed() or not labels:
        return labels
    names = list(labels)
    stacked = torch.stack([labels[n].long() for n in names], dim=1)
    gathered = _gather_padded(stacked, _sizes(stacked.shape[0], stacked.device))
    return {n: gathered[:, i] for i, n in enumerate(names)}
