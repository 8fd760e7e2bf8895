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
    strata: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mini-batch CLUB estimate ``positive - negative`` from DAC logits ``[B, K]`` and labels ``[B]``.

    positive = mean_i log q(y_i|z_i); negative = mean over ordered pairs i != j of log q(y_j|z_i)
    (``negatives="offdiag"``, the reference) or over all B² pairs (``"full"``, original CLUB).
    Rows labelled ``ignore_index`` are left out. Fewer than two valid rows, or a single class present,
    give an exact, differentiable 0 (never NaN). Computed in (at least) fp32; only the
    label-range check syncs the device.

    ``strata`` (optional, integer ``[B]``, ``ignore_index`` = unknown) turns it into a *conditional*
    estimate of I(a; z | s): negatives pair only rows of the same stratum, and the per-stratum estimates
    are averaged with weights n_s (strata with < 2 rows drop out). With s = the task label (the lesion class,
    the finding), label information that merely correlates with the attribute in the training data is not
    penalised — only what z says about the attribute beyond the label (an equalised-odds-style target).
    """
    _check_inputs(logits, labels, negatives, ignore_index)
    if strata is not None:
        return _conditional_club(logits, labels, strata, negatives, ignore_index)
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


def _conditional_club(logits: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor, negatives: str,
                      ignore_index: int) -> torch.Tensor:
    """sum_s (n_s / N) * CLUB_s, every term in O(B·K) through per-stratum class counts."""
    if not isinstance(strata, torch.Tensor) or strata.dim() != 1 or strata.shape[0] != logits.shape[0]:
        raise ValueError(f"strata must be an integer tensor of shape [B] = [{logits.shape[0]}], got "
                         f"{tuple(getattr(strata, 'shape', ()))}")
    if strata.is_floating_point() or strata.dtype == torch.bool:
        raise ValueError(f"strata must be an integer tensor, got dtype {strata.dtype}")
    labels = labels.to(device=logits.device, dtype=torch.long)
    strata = strata.to(device=logits.device, dtype=torch.long)
    lp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    valid = (labels != ignore_index) & (strata != ignore_index)
    y = torch.where(valid, labels, torch.zeros_like(labels))
    _, s = torch.unique(torch.where(valid, strata, torch.zeros_like(strata)), return_inverse=True)
    n_strata, n_classes = int(s.max()) + 1 if s.numel() else 1, logits.shape[1]
    lp = torch.where(valid[:, None], lp, torch.zeros_like(lp))
    w = valid.to(lp.dtype)
    counts = torch.zeros(n_strata * n_classes, dtype=lp.dtype, device=lp.device)
    counts = counts.scatter_add_(0, s * n_classes + y, w).view(n_strata, n_classes)      # c_{s,k}
    pos_i = lp.gather(1, y[:, None]).squeeze(1)                                          # log q(y_i|z_i)
    cross_i = (lp * counts[s]).sum(1)                                                    # sum_{j in s(i)} log q(y_j|z_i)
    zeros = torch.zeros(n_strata, dtype=lp.dtype, device=lp.device)
    n_s = zeros.scatter_add(0, s, w)
    pos_s = zeros.scatter_add(0, s, pos_i)
    cross_s = zeros.scatter_add(0, s, cross_i)
    if negatives == "offdiag":
        neg_s = (cross_s - pos_s) / (n_s * (n_s - 1)).clamp(min=1.0)
    else:
        neg_s = cross_s / (n_s * n_s).clamp(min=1.0)
    mi_s = pos_s / n_s.clamp(min=1.0) - neg_s
    weight = torch.where(n_s >= 2, n_s, torch.zeros_like(n_s))
    total = weight.sum()
    mi = (weight * mi_s).sum() / total.clamp(min=1.0)
    return torch.where(total > 0, mi, torch.zeros_like(mi))
