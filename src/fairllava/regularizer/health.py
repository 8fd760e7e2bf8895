"""DAC health: a held-out (prequential) balanced accuracy of the DAC heads, and the dead-DAC check.

Why: a CLUB penalty is only as strong as its variational classifier. Under the paper's literal estimator
settings on an LM with outlier dimensions, the DAC stays at chance for a whole run, the estimate is ~0 and the
run equals vanilla LoRA, while a logged MI near 0 looks like success (docs/benchmark.md). A training accuracy
cannot tell "cannot learn" from "overfits one batch", so we score every batch with the heads *before* they are
updated on it (prequential evaluation: each prediction is on data the heads have not been fitted to) and keep
the last ``window`` samples. After ``dac_health_warmup_steps`` a DAC whose held-out balanced accuracy is not
above chance + margin is reported once (``on_dead_dac``: warn / error / ignore).

Chance for a balanced accuracy is 1/K_present whatever the class balance (the plain accuracy of a dead DAC sits
at the majority share instead). Late in a run a DAC at chance can also mean the penalty succeeded, so the check
runs once, at the warm-up; set ``dac_warmup_steps`` >= it to check before the penalty starts.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import FairllavaError
from .distributed import is_distributed

_log = logging.getLogger("fairllava")


class DeadDACWarning(UserWarning):
    """The DAC heads stayed at chance through the health warm-up: the MI penalty is close to a no-op."""


class DeadDACError(FairllavaError):
    """``on_dead_dac: error`` tripped (the trainer then leaves no checkpoint that looks complete)."""


class DACHealth(nn.Module):
    """Ring buffer of prequential (prediction, label) pairs per attribute; buffers, so resume stays exact."""

    def __init__(self, num_classes: Mapping[str, int], window: int, ignore_index: int) -> None:
        super().__init__()
        self.names = list(num_classes)
        self.k_max = max(num_classes.values())
        self.ignore_index = ignore_index
        a = len(self.names)
        self.register_buffer("pred", torch.full((window, a), ignore_index, dtype=torch.long))
        self.register_buffer("label", torch.full((window, a), ignore_index, dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))     # rows ever pushed (monotone)
        self.register_buffer("checked", torch.zeros((), dtype=torch.long))  # 1 once the check has run
        # Python mirrors of seen/checked, so the per-step check costs no device sync (None = re-read the buffers,
        # e.g. after a checkpoint was loaded)
        self._seen: int | None = 0
        self._checked: bool | None = False
        self.register_load_state_dict_post_hook(lambda module, _: module._forget_mirrors())

    def _forget_mirrors(self) -> None:
        self._seen, self._checked = None, None

    @torch.no_grad()
    def record(self, preds: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
               keep: torch.Tensor | None = None) -> None:
        """Push one batch's predictions (made before the heads trained on it); ``keep`` = one row per sample."""
        p = torch.stack([preds[n].long() for n in self.names], dim=1).to(self.pred.device)
        y = torch.stack([labels[n].long() for n in self.names], dim=1).to(self.pred.device)
        if keep is not None:
            keep = keep.to(p.device)
            p, y = p[keep], y[keep]
        w = self.pred.shape[0]
        p, y = p[-w:], y[-w:]
        pos = (self.seen + torch.arange(p.shape[0], device=p.device)) % w
        self.pred[pos] = p
        self.label[pos] = y
        self.seen += p.shape[0]
        if self._seen is not None:
            self._seen += p.shape[0]

    @torch.no_grad()
    def counts(self) -> torch.Tensor:
        """``[A, 2, K_max]``: labelled rows and correct predictions per attribute and true class."""
        out = torch.zeros(len(self.names), 2, self.k_max, dtype=torch.float64, device=self.pred.device)
        for j in range(len(self.names)):
            y, p = self.label[:, j], self.pred[:, j]
            valid = y != self.ignore_index
            yv = torch.where(valid, y, torch.zeros_like(y))
            out[j, 0].scatter_add_(0, yv, valid.double())
            out[j, 1].scatter_add_(0, yv, (valid & (p == y)).double())
        return out

    @staticmethod
    def balanced_accuracy(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bacc [A], chance [A])`` from :meth:`counts`; NaN where fewer than two classes were seen."""
        total, correct = counts[:, 0], counts[:, 1]
        present = total > 0
        n_present = present.sum(1)
        recall = torch.where(present, correct / total.clamp(min=1), torch.zeros_like(total))
        bacc = recall.sum(1) / n_present.clamp(min=1)
        ok = n_present >= 2
        nan = torch.full_like(bacc, float("nan"))
        return torch.where(ok, bacc, nan), torch.where(ok, 1.0 / n_present.clamp(min=1), nan)

    def stats(self) -> dict[str, torch.Tensor]:
        """``dac_bacc/<attribute>`` (held-out balanced accuracy over the window) for the step's logs."""
        bacc, _ = self.balanced_accuracy(self.counts())
        return {f"dac_bacc/{n}": bacc[j].float() for j, n in enumerate(self.names)}

    def maybe_check(self, step: int, cfg: Any) -> None:
        """Run the dead-DAC check once, at the first call at or after the warm-up with enough rows seen.

        Every rank calls this at the same micro-batch; the counts are summed over ranks first, so all ranks
        take the same decision (an error on one rank only would hang the others).
        """
        if cfg.on_dead_dac == "ignore" or step < cfg.dac_health_warmup_steps:
            return
        if self._checked is None or self._seen is None:
            self._checked, self._seen = bool(self.checked), int(self.seen)
        if self._checked or self._seen < min(self.pred.shape[0], 64):
            return
        counts = self.counts()
        if is_distributed():
            dist.all_reduce(counts)
        self.checked.fill_(1)
        self._checked = True
        bacc, chance = self.balanced_accuracy(counts)
        dead = [(n, float(bacc[j]), float(chance[j])) for j, n in enumerate(self.names)
                if bool(torch.isfinite(bacc[j])) and float(bacc[j]) < float(chance[j]) + cfg.dac_health_margin]
        if not dead:
            return
        msg = dead_dac_message(dead, step, cfg)
        if cfg.on_dead_dac == "error":
            raise DeadDACError(msg)
        _log.warning(msg)
        warnings.warn(msg, DeadDACWarning, stacklevel=3)


def dead_dac_message(dead: list[tuple[str, float, float]], step: int, cfg: Any) -> str:
    """One line: which DACs are dead, the measured numbers, the usual causes present in ``cfg``, the switch."""
    what = ", ".join(f"{n} {b:.2f} (chance {c:.2f})" for n, b, c in dead)
    causes = []
    if cfg.l2_normalize and not cfg.mi_standardize:
        causes.append("L2 normalisation over outlier dimensions (mi_l2_normalize; try mi_standardize: true, "
                      "mi_l2_normalize: false)")
    if cfg.dac_lr is None:
        causes.append("a DAC lr equal to the LoRA lr (dac_lr: null; try dac_lr: 1.0e-2)")
    if cfg.mi_pooling == "random_token":
        causes.append("one random token per sample (mi_pooling: random_token; try token)")
    hint = "; ".join(causes) if causes else ("none of the usual causes (L2 over outlier dimensions, DAC lr = LoRA "
                                             "lr, one random token) is set: check the layer and the labels")
    return (f"fairness: DEAD DAC - after {step} steps the held-out balanced accuracy of the DAC is at chance for "
            f"{what}, so the MI penalty is ~0 and this run is close to vanilla LoRA; likely causes: {hint}; "
            f"if the penalty already removed the attribute, set dac_warmup_steps >= dac_health_warmup_steps="
            f"{cfg.dac_health_warmup_steps}; fairness.on_dead_dac={cfg.on_dead_dac} (warn | error | ignore)")
