"""CLUB upper bound on I(attribute; z) for a categorical attribute, in O(B·K).

Why a closed form: the reference builds the B×B matrix L_ij = log q(y_j | z_i); with token-level pooling or
cross-rank gathering B reaches thousands, so we use sum_j L_ij = sum_k c_k log q(k | z_i) (c_k = class counts,
a constant), which is exact in value and gradient (METHOD.md §4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVES = ("offdiag", "full", "other_samples")


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
    *,
    groups: torch.Tensor | None = None,
    partner_labels: torch.Tensor | None = None,
    partner_strata: torch.Tensor | None = None,
    skip_single_group_strata: bool = False,
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

    Options of the *anchor form* (:func:`_anchor_club`; any of them switches to it):
    ``negatives="other_samples"`` with ``groups`` ([B] sample id of each row, token pooling) leaves pairs of rows
    from the same sample out of the negative term; ``partner_labels`` / ``partner_strata`` ([M], e.g. a queue of
    past batches) add label partners to the negative term (they carry no z, hence no gradient);
    ``skip_single_group_strata`` gives no weight to a stratum whose rows all share one attribute class.
    """
    _check_inputs(logits, labels, negatives, ignore_index)
    if negatives == "other_samples" or groups is not None or partner_labels is not None or skip_single_group_strata:
        return _anchor_club(logits, labels, strata, negatives, ignore_index, groups, partner_labels,
                            partner_strata, skip_single_group_strata)
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


def _int_vector(name: str, x: torch.Tensor | None, n: int | None) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.is_floating_point() or x.dtype == torch.bool or \
            (n is not None and x.shape[0] != n):
        raise ValueError(f"{name} must be an integer tensor of shape [{'B' if n is None else n}], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def _anchor_club(logits: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor | None, negatives: str,
                 ignore_index: int, groups: torch.Tensor | None, partner_labels: torch.Tensor | None,
                 partner_strata: torch.Tensor | None, skip_single: bool) -> torch.Tensor:
    """CLUB over explicit (anchor, partner) pairs, in O((B+M)·K): per stratum s, the mean over pairs (i, j), i an
    anchor of s and j in P_i, of ``log q(y_i|z_i) - log q(y_j|z_i)``; strata averaged with weights = their anchors.

    P_i = the rows and partners of i's stratum, minus i itself (``offdiag``), minus every row of i's sample
    (``other_samples``; ``groups`` = sample ids, default one sample per row), or nothing (``full``). Without
    partners the pair set is symmetric, so the estimate is exactly 0 when q ignores z even if samples contribute
    unequal numbers of rows; without groups it is :func:`club_mi`'s reference form (equal partner counts).
    Anchors with no partner, in a stratum of < 2 labelled rows, or (``skip_single``) in a stratum whose rows
    all carry one class are left out; none left -> an exact, graph-connected 0.
    """
    n = logits.shape[0]
    dev = logits.device
    _int_vector("groups", groups, n)
    _int_vector("strata", strata, n)
    _int_vector("partner_labels", partner_labels, None)
    if partner_labels is not None:
        check_labels(partner_labels, logits.shape[1], ignore_index, "partner_labels")
    if (partner_strata is None) != (partner_labels is None or strata is None):
        raise ValueError("partner_strata must be given exactly when both partner_labels and strata are")
    if partner_strata is not None:
        _int_vector("partner_strata", partner_strata, partner_labels.shape[0])
    k = logits.shape[1]
    lp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    y = labels.to(device=dev, dtype=torch.long)
    valid = y != ignore_index
    s = torch.zeros_like(y) if strata is None else strata.to(device=dev, dtype=torch.long)
    valid = valid & (s != ignore_index)
    if partner_labels is not None:
        yq = partner_labels.to(device=dev, dtype=torch.long)
        sq = torch.zeros_like(yq) if partner_strata is None else partner_strata.to(device=dev, dtype=torch.long)
        vq = (yq != ignore_index) & (sq != ignore_index)
    else:
        yq = sq = torch.zeros(0, dtype=torch.long, device=dev)
        vq = torch.zeros(0, dtype=torch.bool, device=dev)
    # Dense stratum ids over anchors and partners together (invalid rows go to id 0 with weight 0).
    s_all = torch.cat([torch.where(valid, s, torch.zeros_like(s)), torch.where(vq, sq, torch.zeros_like(sq))])
    _, s_all = torch.unique(s_all, return_inverse=True)
    n_strata = int(s_all.max()) + 1 if s_all.numel() else 1
    s_a, s_q = s_all[:n], s_all[n:]
    y0, yq0 = torch.where(valid, y, torch.zeros_like(y)), torch.where(vq, yq, torch.zeros_like(yq))
    counts = torch.zeros(n_strata * k, dtype=lp.dtype, device=dev)
    counts.scatter_add_(0, s_a * k + y0, valid.to(lp.dtype))
    counts.scatter_add_(0, s_q * k + yq0, vq.to(lp.dtype))
    counts = counts.view(n_strata, k)                                   # c_{s,k} over anchors + partners
    lp = torch.where(valid[:, None], lp, torch.zeros_like(lp))
    pos_i = lp.gather(1, y0[:, None]).squeeze(1)                          # log q(y_i | z_i)
    cross_i = (lp * counts[s_a]).sum(1)                                   # sum over i's stratum pool
    pool_n = counts.sum(1)[s_a]
    if negatives == "full":
        own_i, own_n = torch.zeros_like(pos_i), torch.zeros_like(pos_i)
    elif negatives == "offdiag" or groups is None:
        own_i, own_n = pos_i, torch.ones_like(pos_i)
    else:  # other_samples: subtract the row's own (sample, stratum) block
        g = groups.to(device=dev, dtype=torch.long)
        _, key = torch.unique(torch.stack([g, s_a]), dim=1, return_inverse=True)
        n_keys = int(key.max()) + 1 if key.numel() else 1
        own = torch.zeros(n_keys * k, dtype=lp.dtype, device=dev).scatter_add_(0, key * k + y0, valid.to(lp.dtype))
        own = own.view(n_keys, k)[key]
        own_i, own_n = (lp * own).sum(1), own.sum(1)
    n_pairs = pool_n - own_n
    ok = valid & (n_pairs > 0) & (pool_n >= 2)
    if skip_single:
        ok = ok & ((counts > 0).sum(1)[s_a] >= 2)
    contrast = pos_i - (cross_i - own_i) / n_pairs.clamp(min=1.0)
    # Within a stratum: the mean over its (anchor, partner) pairs of log q(y_i|z_i) - log q(y_j|z_i), i.e. anchors
    # weighted by their partner counts; across strata: weights = eligible anchors (today's n_s weighting).
    wp = torch.where(ok, n_pairs, torch.zeros_like(n_pairs))
    zeros = torch.zeros(n_strata, dtype=lp.dtype, device=dev)
    num = zeros.scatter_add(0, s_a, torch.where(ok, wp * contrast, torch.zeros_like(contrast)))
    den = zeros.scatter_add(0, s_a, wp)
    n_anchor = zeros.scatter_add(0, s_a, ok.to(lp.dtype))
    mi_s = num / den.clamp(min=1.0)
    total = n_anchor.sum()
    mi = (n_anchor * mi_s).sum() / total.clamp(min=1.0)
    return torch.where(total > 0, mi, torch.zeros_like(mi))
