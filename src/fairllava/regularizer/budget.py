"""A separate gradient budget for the MI penalty (``fairness.penalty_grad_clip`` / ``penalty_grad_ratio``).

Why: with one global clip norm the terms are coupled. Measured on the demo model, the penalty's gradient norm
(~25) dwarfs the LM loss's (~3), so clipping their sum to 1.0 shrinks the LM update ~8x whenever the penalty
is on (docs/benchmark.md), a plausible cause of "levelling down". Here the LM gradient is clipped to
``optim.max_grad_norm`` on its own, the penalty's gradient is scaled to norm <= ``penalty_grad_clip`` and/or
<= ``penalty_grad_ratio`` x the clipped LM norm, and the two are summed, so an active penalty never shrinks
the LM part of the update (tested). The DAC heads (which get only their own CE) are clipped on their own too.

Cost, and why two passes: the penalty and the LM loss meet at the tapped hidden state, and below it both flow
through the same layers, so their parameter gradients can only be told apart by differentiating them
separately. Per micro-batch the penalty is differentiated first (``torch.autograd.grad`` with the graph
retained, through the layers at or below the tapped one only), then the usual backward runs without it. That
is a partial second backward, paid only when a budget is set; the default (joint clipping, the reference) costs
nothing. Clipping the gradient at z instead would be one pass, but ||dP/dz|| bounds nothing about the
parameter update: the Jacobian below the tap sets that, so it would not give the guarantee above.

Supports one process and DDP (the buffer is averaged over processes like DDP averages gradients); not FSDP /
DeepSpeed (sharded parameters) and not fp16 loss scaling (the penalty pass is unscaled); bf16 is fine.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from ..errors import FairllavaError


class PenaltyBudget:
    """Accumulates the penalty's gradient apart from ``.grad``, then clips and merges it (one optimizer step)."""

    def __init__(self, model_params: Iterable[torch.nn.Parameter], head_params: Iterable[torch.nn.Parameter],
                 clip: Optional[float], ratio: Optional[float]) -> None:
        if clip is None and ratio is None:
            raise ValueError("PenaltyBudget needs penalty_grad_clip and/or penalty_grad_ratio")
        self.params = [p for p in model_params if p.requires_grad]
        self.head_params = [p for p in head_params if p.requires_grad]
        self.clip, self.ratio = clip, ratio
        self.buf: Optional[list[torch.Tensor]] = None

    @classmethod
    def for_optimizer(cls, cfg: Any, optimizer: torch.optim.Optimizer, accelerator: Any = None) -> "PenaltyBudget":
        """Model parameters = the optimizer group named ``model`` (the trainer's), heads = the other groups."""
        if accelerator is not None:
            kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
            if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
                raise FairllavaError(f"fairness.penalty_grad_clip / penalty_grad_ratio: not supported under {kind} "
                                     "(sharded parameters); use DDP or set both to null for joint clipping")
            if str(getattr(accelerator, "mixed_precision", "no")) == "fp16":
                raise FairllavaError("fairness.penalty_grad_clip / penalty_grad_ratio: not supported with "
                                     "optim.mixed_precision=fp16 (loss scaling); use bf16 or no")
        model = [p for g in optimizer.param_groups if g.get("name") == "model" for p in g["params"]]
        heads = [p for g in optimizer.param_groups if g.get("name") != "model" for p in g["params"]]
        return cls(model, heads, cfg.penalty_grad_clip, cfg.penalty_grad_ratio)

    def accumulate(self, penalty_loss: Optional[torch.Tensor], scale: float = 1.0) -> None:
        """Add ``scale * d(penalty_loss)/d(model params)`` to the buffer; keeps the graph for the main backward."""
        if penalty_loss is None or not penalty_loss.requires_grad:
            return  # e.g. the DAC warm-up: the penalty is a constant 0
        grads = torch.autograd.grad(penalty_loss * scale, self.params, retain_graph=True, allow_unused=True)
        if self.buf is None:
            self.buf = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        for b, g in zip(self.buf, grads):
            if g is not None:
                b.add_(g.float())

    @staticmethod
    def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))

    def apply(self, max_grad_norm: float, accelerator: Any = None) -> dict[str, float]:
        """Clip the LM gradients (in ``.grad``) and the heads' on their own, scale the penalty's, sum; logs."""
        world = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
        if self.buf is not None and world > 1:
            flat = torch.cat([b.reshape(-1) for b in self.buf])
            flat = accelerator.reduce(flat, reduction="mean")
            self.buf = list(torch.split(flat, [b.numel() for b in self.buf]))
            self.buf = [f.view_as(p) for f, p in zip(self.buf, self.params)]
        max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
        lm = [p for p in self.params if p.grad is not None]
        lm_norm = float(torch.nn.utils.clip_grad_norm_(lm, max_norm)) if lm else 0.0
        heads = [p for p in self.head_params if p.grad is not None]
        if heads:
            torch.nn.utils.clip_grad_norm_(heads, max_norm)
        logs = {"grad_norm": lm_norm, "penalty_grad_norm": 0.0, "penalty_grad_scale": 1.0}
        if self.buf is None:
            return logs
        pen_norm = float(self._norm(self.buf))
        limit = math.inf
        if self.clip is not None:
            limit = min(limit, self.clip)
        if self.ratio is not None:
            limit = min(limit, self.ratio * min(lm_norm, max_norm))
        scale = min(1.0, limit / (pen_norm + 1e-6))
        for p, b in zip(self.params, self.buf):
            g = (b * scale).to(p.dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.buf = None
        logs.update({"penalty_grad_norm": pen_norm, "penalty_grad_scale": scale})
        return logs
