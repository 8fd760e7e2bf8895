"""CLUB upper bound on I(attribute; z) for a categorical attribute, in O(B·K).

Why a closed form: the reference builds the B×B matrix L_ij = log q(y_j | z_i); with token-level pooling or
cross-rank gathering B reaches thousands, so we use sum_j L_ij = sum_k c_k log q(k | z_i) (c_k = class counts,
a constant), which is exact in value and gradient (METHOD.md §4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVES = ("offdiag", "full")


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Raise ``ValueError`` naming ``name`` if a label is neither in [0, num_classes) nor ``ignore_index``."""
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{pos}] = {int(labels[pos])} is out of range: expected 0..{num_classes - 1} "
            f"or ignore_index={ignore_index}"
        )


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, negatives: str, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("logits and labels must be torch.Tensor")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, K], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one class column (K >= 1)")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape [B] = [{logits.shape[0]}] to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    check_labels(labels, logits.shape[1], ignore_index)


def club_mi(
    logits: torch.Tensor,
    labels: torch.Tensor,
    negatives: str = "offdiag",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mini-batch CLUB estimate ``positive - negative`` from DAC logits ``[B, K]`` and labels ``[B]``.

    positive = mean_i log q(y_i|z_i); negative = mean over ordered pairs i != j of log q(y_j|z_i)
    (``negatives="offdiag"``, the reference) or over all B² pairs (``"full"``, original CLUB).
    Rows labelled ``ignore_index`` are left out. Fewer than two valid rows, or a single class present,
    give an exact, differentiable 0 (never NaN). Computed in (at least) fp32; only the
    label-range check syncs the device.
    """
    _check_inputs(logits, labels, negatives, ignore_index)
    labels = labels.to(device=logits.device, dtype=torch.long)
    n_classes = logits.shape[1]
    # At least fp32 (bf16/fp16 logits are upcast); fp64 inputs stay fp64.
    lp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [B, K]
    valid = labels != ignore_index
    w = valid.to(lp.dtype)  # row weights: 1 valid, 0 ignored
    y = torch.where(valid, labels, torch.zeros_like(labels))
    # Ignored rows must contribute exactly 0 (also to the gradient), whatever their logits.
    lp = torch.where(valid[:, None], lp, torch.zeros_like(lp))
    pos_sum = lp.gather(1, y[:, None]).squeeze(1).sum()
    counts = torch.zeros(n_classes, dtype=lp.dtype, device=lp.device).scatter_add_(0, y, w)
    cross = (lp.sum(0) * counts).sum()  # sum_i sum_j log q(y_j | z_i), over valid i, j
    n = w.sum()
    positive = pos_sum / n.clamp(min=1.0)
    if negatives == "offdiag":
        negative = (cross - pos_sum) / (n * (n - 1)).clamp(min=1.0)
    else:
        negative = cross / (n * n).clamp(min=1.0)
    mi = positive - negative
    # |V| < 2 or one class present: the estimate is 0 by definition; keep the graph (zero gradient).
    defined = (n >= 2) & ((counts > 0).sum() >= 2)
    return torch.where(defined, mi, torch.zeros_like(mi))
