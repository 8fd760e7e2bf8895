"""Demographic attribute classifiers (DAC heads) and their training losses.

Why here: the heads are the variational q(a|z) of the CLUB bound (METHOD.md §3). The reference head is one
``Linear(D, K)`` (the paper's ~57K parameters for D=4096 and 14 classes); an MLP is optional. The loss modes
other than plain CE exist for the adversarial baseline and the pre-trained-DAC ablation and must work anywhere.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .club import check_labels


def build_head(hidden_size: int, num_classes: int, dac_hidden_size: int | None = None) -> nn.Module:
    """``Linear(D, K)`` or ``Linear(D, H) -> ReLU -> Linear(H, K)`` (the reference's never-enabled MLP)."""
    if dac_hidden_size is None:
        return nn.Linear(hidden_size, num_classes)
    return nn.Sequential(nn.Linear(hidden_size, dac_hidden_size), nn.ReLU(), nn.Linear(dac_hidden_size, num_classes))


def _zero(logits: torch.Tensor) -> torch.Tensor:
    # A graph-connected exact zero: an attribute with no known label contributes nothing and never NaN.
    return logits.float()[:0].sum()


def balanced_class_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class-balanced ("effective number", Cui et al. 2019) weights, normalised to sum to K.

    Absent classes (count 0) get weight 0: they never occur as targets when counts come from the training set.
    """
    counts = counts.double()
    eff = 1.0 - torch.pow(torch.full_like(counts, beta), counts)
    w = torch.where(counts > 0, (1.0 - beta) / eff.clamp(min=1e-300), torch.zeros_like(counts))
    return (w / w.sum() * counts.numel()).float()


def dac_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "ce",
    ignore_index: int = -100,
    class_counts: torch.Tensor | None = None,
    gamma: float = 2.0,
    beta: float = 0.999994,
    tau: float = 0.5,
) -> torch.Tensor:
    """Mean DAC loss over rows whose label is known; 0 (graph-connected) if there is none.

    ``ce``: softmax CE. ``focal``: -(1-p_y)^gamma log p_y. ``balanced``: CE with effective-number class weights
    (weighted mean). ``logit_adjusted``: CE on ``logits - tau * log prior`` (METHOD.md §3, as in the reference).
    ``balanced`` and ``logit_adjusted`` need ``class_counts`` ([K], training-set counts).
    """
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"dac_loss: expected logits [B, K] and labels [B], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    k = logits.shape[1]
    check_labels(labels, k, ignore_index)
    labels = labels.to(device=logits.device, dtype=torch.long)
    valid = labels != ignore_index
    logits = logits.float()
    if mode in ("balanced", "logit_adjusted"):
        if class_counts is None:
            raise ValueError(f"dac_loss mode {mode!r} needs class counts (set dac_class_counts in the config "
                             "or call FairnessRegularizer.set_class_counts)")
        class_counts = class_counts.to(device=logits.device, dtype=torch.float32)
        if class_counts.shape != (k,):
            raise ValueError(f"class_counts must have shape [{k}], got {tuple(class_counts.shape)}")
    y = torch.where(valid, labels, torch.zeros_like(labels))
    w = valid.float()
    if mode == "ce":
        nll = F.cross_entropy(logits, y, reduction="none")
    elif mode == "focal":
        lp = F.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)
        nll = -((1.0 - lp.exp()).clamp(min=0.0) ** gamma) * lp
    elif mode == "balanced":
        cw = balanced_class_weights(class_counts, beta)
        nll = F.cross_entropy(logits, y, reduction="none")
        w = w * cw[y]
    elif mode == "logit_adjusted":
        prior = class_counts.clamp(min=1.0) / class_counts.clamp(min=1.0).sum()
        nll = F.cross_entropy(logits - tau * prior.log(), y, reduction="none")
    else:
        raise ValueError(f"dac_loss mode must be one of ['ce', 'focal', 'balanced', 'logit_adjusted'], got {mode!r}")
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    denom = w.sum()
    loss = (nll * w).sum() / denom.clamp(min=1e-12)
    return torch.where(denom > 0, loss, _zero(logits))
