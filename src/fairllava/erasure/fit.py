"""Method ``erasure``: LEACE of the demographic attributes from the image features where they enter the LM.

Where: the projector's input, i.e. the frozen vision tower's output. Stage 2 trains the projector and LoRA but
never the vision tower, so the features the eraser is fitted on are the features it sees for the whole run and at
inference. A fit after the projector would go stale as soon as the projector moves.

What (``erasure.mode``):
- ``conditional`` (default): remove, with ONE affine map, every direction along which the attribute's class means
  differ *within* a task label (records' ``label``). Per attribute ``a`` and label ``y`` we accumulate the
  within-label cross-covariance ``S_ay = Cov(x, onehot(a) | y)``; LEACE is fitted on the pooled feature covariance
  and the stacked ``[S_a1 .. S_aL]``. Then ``Cov(E x, onehot(a) | y) = 0`` for every ``y`` at once, so within
  each label no linear read-out of the attribute beats a constant, while the between-label directions (the task
  signal, which may correlate with the attribute) are kept. The map needs no label at inference, where none exists.
  This equals ``LeaceFitter`` fed with the attribute one-hot centred within each label, one block per label.
- ``global``: plain LEACE on ``Cov(x, onehot(a))``. It also removes the label direction when the label correlates
  with the attribute (it levels the task down) and does not guard within labels.

Granularity: every image token is one sample of the fit (its sample's labels). Guarding tokens also guards the
mean over tokens (the class means of the mean are means of the class means). A probe that reads positions jointly
(e.g. a concatenation of tokens) is not guarded; nor is any nonlinear read-out, which is what the benchmark measures.

Notes from the package: a multi-class attribute must be one-hot (integer codes erase one direction and leave the
rest readable); statistics are accumulated in float64 (the package refuses bf16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FairllavaError
from ..training.methods import Method
from .layer import ERASER_FILE, FeatureEraser, attach_eraser, detach_eraser, load_eraser, save_eraser

IGNORE_INDEX = -100
MISSING_LABEL = "<no label>"


# ----------------------------------------------------------------------------- labels
@dataclass
class FitLabels:
    """Per fit sample: attribute class ids (``-100`` = missing) and the stratum id (task label, or 0 for global)."""

    attrs: dict[str, torch.Tensor]
    strata: torch.Tensor
    strata_names: list[str]
    classes: dict[str, list[str]]


def fit_labels(records: Sequence[Mapping], attr_ids: Sequence[Mapping[str, int]], vocabs: Mapping[str, Any],
               attributes: Sequence[str], mode: str, source: str = "training data") -> FitLabels:
    """Labels of the fit samples, checked before any feature is computed (bad input costs no model time)."""
    if mode not in ("conditional", "global"):
        raise FairllavaError(f"erasure.mode: expected 'conditional' or 'global', got {mode!r}")
    if mode == "conditional":
        raw = [None if r.get("label") is None else str(r["label"]) for r in records]
        if all(v is None for v in raw):
            raise FairllavaError(
                f"{source}: erasure.mode=conditional needs a 'label' field in the records; none has one "
                "(set erasure.mode: global to erase the attribute marginally)"
            )
        names = sorted({v for v in raw if v is not None}) + ([MISSING_LABEL] if None in raw else [])
        pos = {n: i for i, n in enumerate(names)}
        strata = torch.tensor([pos[MISSING_LABEL if v is None else v] for v in raw], dtype=torch.long)
    else:
        names = ["all"]
        strata = torch.zeros(len(records), dtype=torch.long)
    attrs = {a: torch.tensor([int(ids[a]) for ids in attr_ids], dtype=torch.long) for a in attributes}
    classes = {a: list(vocabs[a].classes) for a in attributes}
    for a, y in attrs.items():
        present = sorted(set(y[y != IGNORE_INDEX].tolist()))
        if len(present) < 2:
            shown = [classes[a][i] for i in present]
            raise FairllavaError(
                f"erasure.attributes: attribute {a!r} has {len(present)} class(es) present in the {source} {shown}; "
                "erasing it needs at least two"
            )
        if mode == "conditional":
            varies = [n for s, n in enumerate(names) if len(set(y[(strata == s) & (y != IGNORE_INDEX)].tolist())) >= 2]
            if not varies:
                raise FairllavaError(
                    f"erasure.mode=conditional: attribute {a!r} takes a single value within every task label of the "
                    f"{source}, so nothing can be erased within labels (use erasure.mode: global)"
                )
    return FitLabels(attrs, strata, names, classes)


# ----------------------------------------------------------------------------- statistics
class ErasureStats:
    """Streaming statistics for one eraser: pooled feature covariance + one cross-covariance block per
    (attribute, stratum), each over the rows where the attribute is known. float64 throughout."""

    def __init__(self, dim: int, num_classes: Mapping[str, int], n_strata: int, *, svd_tol: float = 0.01,
                 constrain_cov_trace: bool = False, device: torch.device | str | None = None) -> None:
        from concept_erasure import LeaceFitter

        self.dim, self.num_classes, self.n_strata = int(dim), dict(num_classes), int(n_strata)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._leace = dict(svd_tol=svd_tol, constrain_cov_trace=constrain_cov_trace)
        self.pooled = LeaceFitter(self.dim, 1, method="leace", dtype=torch.float64, device=self.device, **self._leace)
        self.blocks: dict[tuple[str, int], Any] = {}
        self.n_rows = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, attrs: Mapping[str, torch.Tensor], strata: torch.Tensor) -> None:
        """``x [n, d]`` features; ``attrs[a] [n]`` class ids (-100 missing); ``strata [n]`` stratum ids."""
        from concept_erasure import LeaceFitter

        x = x.reshape(-1, self.dim).to(self.device, torch.float64)
        n = x.shape[0]
        strata = strata.to(self.device)
        self.pooled.update(x, torch.zeros(n, 1, dtype=torch.float64, device=self.device))
        self.n_rows += n
        for a, k in self.num_classes.items():
            y = attrs[a].to(self.device)
            for s in torch.unique(strata).tolist():
                m = (strata == s) & (y != IGNORE_INDEX)
                if not bool(m.any()):
                    continue
                f = self.blocks.get((a, s))
                if f is None:
                    f = self.blocks[(a, s)] = LeaceFitter(self.dim, k, method="orth", dtype=torch.float64,
                                                          device=self.device)
                f.update(x[m], F.one_hot(y[m], k).to(torch.float64))

    def cross_covariances(self) -> list[torch.Tensor]:
        """The unnormalised within-stratum blocks ``sum (x - mean_s)(onehot - mean_s)^T`` ([d, k] each)."""
        return [f.sigma_xz_ for _, f in sorted(self.blocks.items(), key=lambda kv: (kv[0][0], kv[0][1]))]

    def eraser(self) -> FeatureEraser:
        """LEACE on the pooled covariance and the stacked blocks (one affine map for every stratum)."""
        from concept_erasure import LeaceFitter

        if self.n_rows < 2:
            raise FairllavaError(f"erasure: fit needs at least 2 feature rows, got {self.n_rows}")
        sxz = torch.cat(self.cross_covariances(), dim=1)
        fitter = LeaceFitter(self.dim, sxz.shape[1], method="leace", dtype=torch.float64, device=self.device,
                             **self._leace)
        fitter.n = self.pooled.n.clone()
        fitter.mean_x = self.pooled.mean_x.clone()
        fitter.sigma_xx_ = self.pooled.sigma_xx_.clone()
        fitter.sigma_xz_ = sxz  # the blocks are centred within their stratum, so mean_z stays 0
        return FeatureEraser.from_leace(fitter.eraser)

    def residual(self, eraser: FeatureEraser) -> float:
        """Largest ``|E S| / |S|`` over the blocks: how much within-stratum cross-covariance survives (0 = none)."""
        m = eraser.matrix().to(self.device, torch.float64)
        worst = 0.0
        for s in self.cross_covariances():
            norm = float(s.norm())
            if norm > 0:
                worst = max(worst, float((m @ s).norm()) / norm)
        return worst


# ----------------------------------------------------------------------------- features from the model
class _Captured(Exception):
    """Stops the forward once the projector's input is in hand (the LM never runs)."""


@torch.no_grad()
def projector_inputs(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The projector's input (the frozen vision tower's output) for one batch, without an attached eraser."""
    from .layer import _first_tensor, _projector

    proj = _projector(model)
    got: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        got["x"] = _first_tensor(args, kwargs)[1].detach()
        raise _Captured

    handle = proj.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "x" not in got:
        raise FairllavaError(
            f"model {type(model).__name__}: the forward never called the projector (no image in the batch?)"
        )
    return got["x"]


def fit_eraser(model: nn.Module, collator: Any, items: Sequence[Any], labels: FitLabels, *, batch_size: int,
               device: torch.device | str, svd_tol: float = 0.01, constrain_cov_trace: bool = False,
               progress: bool = False) -> tuple[FeatureEraser, dict]:
    """Fit on ``items`` (dataset items, aligned with ``labels``): one pass of the vision tower, no gradients.

    Every sample must carry exactly one image (the projector's input has one row per sample).
    """
    from ..training.logging import Progress
    from ..training.trainer import _BATCH_META, _to_device

    n = len(items)
    stats: Optional[ErasureStats] = None
    was_training = model.training
    previous = detach_eraser(model)
    model.eval()
    bar = Progress(math.ceil(n / batch_size), 0, enabled=progress, description="erasure fit")
    try:
        for b, start in enumerate(range(0, n, batch_size)):
            batch = _to_device(collator(list(items[start:start + batch_size])), torch.device(device))
            inputs = {k: v for k, v in batch.items() if k not in _BATCH_META and isinstance(v, torch.Tensor)}
            x = projector_inputs(model, inputs)
            rows = min(batch_size, n - start)
            if x.dim() not in (2, 3) or x.shape[0] != rows:
                raise FairllavaError(
                    f"erasure: the projector's input has shape {tuple(x.shape)} for a batch of {rows} samples; "
                    "the fit needs one image per sample ([B, tokens, width])"
                )
            tokens = 1 if x.dim() == 2 else x.shape[1]
            if stats is None:
                stats = ErasureStats(x.shape[-1], {a: len(c) for a, c in labels.classes.items()},
                                     len(labels.strata_names), svd_tol=svd_tol,
                                     constrain_cov_trace=constrain_cov_trace, device=device)
            sl = slice(start, start + rows)
            stats.update(x.reshape(rows * tokens, -1),
                         {a: y[sl].repeat_interleave(tokens) for a, y in labels.attrs.items()},
                         labels.strata[sl].repeat_interleave(tokens))
            bar.update(b + 1)
    finally:
        bar.close()
        model.train(was_training)
        if previous is not None:
            attach_eraser(model, previous)
    assert stats is not None
    eraser = stats.eraser()
    if eraser.rank == 0:  # every whitened cross-covariance direction fell below svd_tol: nothing would be erased
        raise FairllavaError(f"erasure.svd_tol={svd_tol}: the fitted eraser has rank 0 and would erase nothing; "
                             "lower it (default 0.01)")
    meta = {"n_samples": n, "n_rows": stats.n_rows, "dim": eraser.dim, "rank": eraser.rank,
            "strata": labels.strata_names, "classes": labels.classes, "svd_tol": svd_tol,
            "constrain_cov_trace": constrain_cov_trace, "residual_xcov": stats.residual(eraser)}
    return eraser.cpu(), meta


# ----------------------------------------------------------------------------- the training method
class ErasureMethod(Method):
    """Vanilla LM loss; the fitted eraser sits, fixed, in front of the projector (attached to the model)."""

    name = "erasure"

    def __init__(self, eraser: FeatureEraser, meta: Mapping[str, Any], ce_loss_weight: float = 1.0) -> None:
        super().__init__(ce_loss_weight)
        self.eraser = eraser
        self.meta = dict(meta)

    def save_artifacts(self, out_dir: str | Path) -> None:
        save_eraser(self.eraser, Path(out_dir) / ERASER_FILE, self.meta)


def build_erasure_method(cfg: Any, model: nn.Module, processor: Any, dataset: Any, indices: Sequence[int],
                         device: torch.device | str, resume_dir: Optional[Path] = None,
                         progress: bool = False) -> ErasureMethod:
    """The trainer's entry: fit on the training split (or reuse the checkpoint's eraser on resume) and attach it."""
    from ..data import VLMCollator

    e = cfg.erasure
    if resume_dir is not None and (Path(resume_dir) / ERASER_FILE).is_file():
        eraser, meta = load_eraser(Path(resume_dir) / ERASER_FILE)
    else:
        chosen = list(indices)
        if e.max_fit_samples is not None and e.max_fit_samples < len(chosen):
            g = torch.Generator().manual_seed(int(cfg.optim.seed))
            pick = sorted(torch.randperm(len(chosen), generator=g)[: e.max_fit_samples].tolist())
            chosen = [chosen[i] for i in pick]
        attributes = list(e.attributes) if e.attributes else list(cfg.data.attributes)
        labels = fit_labels([dataset.records[i] for i in chosen], [dataset.attr_ids[i] for i in chosen],
                            dataset.vocabs, attributes, e.mode, source=f"training split ({cfg.data.train})")
        collator = VLMCollator(processor, dataset.vocabs, mode="train", max_length=cfg.data.max_length,
                               system_prompt=cfg.data.system_prompt)
        model.to(device)
        eraser, meta = fit_eraser(model, collator, _Items(dataset, chosen), labels,
                                  batch_size=cfg.optim.per_device_batch_size, device=device, svd_tol=e.svd_tol,
                                  constrain_cov_trace=e.constrain_cov_trace, progress=progress)
        meta.update({"mode": e.mode, "attributes": attributes, "base_model": cfg.model.path})
    attach_eraser(model, eraser)
    return ErasureMethod(eraser, meta)


class _Items:
    """Lazy ``dataset[indices[i]]`` (images are loaded per batch, not all at once)."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, s: slice) -> list:
        return [self.dataset[i] for i in self.indices[s]]


__all__ = ["ErasureMethod", "ErasureStats", "FitLabels", "build_erasure_method", "fit_eraser", "fit_labels",
           "projector_inputs"]
