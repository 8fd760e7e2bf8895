"""Training methods: how the loss is built from one model forward (METHOD.md §5, §8, §10).

``lora`` (vanilla), ``fairllava`` (the MI regulariser, joint or alternating), ``reweight``
(group-weighted per-sample LM loss), ``resample`` (vanilla loss + the balanced batch sampler, wired by
the trainer) and ``adversarial`` (an MLP discriminator behind a gradient-reversal layer). ``erasure``
(vanilla loss behind a fitted LEACE eraser) lives in :mod:`fairllava.erasure.fit`.

Why objects: the trainer runs one forward with hidden-state hooks and hands the result to the
method, so every method shares the same data path, checkpointing and logging. A method's trainable
extras (DAC heads, discriminator) live in ``method.module`` so DDP/FSDP wrap them with the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..regularizer.heads import dac_loss

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- gradient reversal
class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-strength``.

    The strength is a required float (the reference forgot to pass it: METHOD.md §12 #3).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:  # type: ignore[override]
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise TypeError(f"GradientReversal: strength must be a float, got {type(strength).__name__}")
        ctx.strength = float(strength)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float) -> torch.Tensor:
    return GradientReversal.apply(x, strength)


@dataclass(frozen=True)
class LinearRampSchedule:
    """``start`` until ``from_frac`` of training, linear to ``end`` at ``to_frac``, then ``end``."""

    start: float = 0.1
    end: float = 1.0
    from_frac: float = 0.01
    to_frac: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.from_frac < self.to_frac <= 1.0:
            raise ValueError(
                f"LinearRampSchedule: expected 0 <= from_frac < to_frac <= 1, got {self.from_frac}, {self.to_frac}"
            )

    def __call__(self, progress: float) -> float:
        """``progress`` = step / total_steps in [0, 1]."""
        p = min(max(float(progress), 0.0), 1.0)
        if p <= self.from_frac:
            return float(self.start)
        if p >= self.to_frac:
            return float(self.end)
        t = (p - self.from_frac) / (self.to_frac - self.from_frac)
        return float(self.start + t * (self.end - self.start))


# ----------------------------------------------------------------------------- LM loss
def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM CE: ``(per_sample_token_mean [B], n_tokens [B])`` in fp32.

    Rows without target tokens (e.g. truncated away) get loss 0 and count 0.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view_as(shift_labels)
    valid = (shift_labels != IGNORE_INDEX)
    n = valid.sum(dim=1)
    per = (tok * valid).sum(dim=1) / n.clamp_min(1)
    return per, n


def token_mean_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean CE over every target token of the batch (LLaVA's loss)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    if not (shift_labels != IGNORE_INDEX).any():
        return shift_logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def target_logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose logits the causal-LM loss reads (a target follows in some row), plus the last.

    Why: with a 49k-token vocabulary and answers of a few tokens, the LM head over every position is about a
    quarter of a training step (bench/bench_training_step.py: x1.35 with compact logits); the loss only reads positions followed by a
    target. The last position is a harmless filler that keeps the usual shift-by-one alignment
    (:func:`compact_labels`).
    """
    need = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    last = torch.tensor([labels.shape[1] - 1], dtype=need.dtype, device=labels.device)
    return torch.cat([need, last])


def compact_labels(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Labels for logits kept at ``positions``: the loss's shift then pairs logits[p] with labels[p + 1]."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([pad, labels[:, positions[:-1] + 1]], dim=1)


# ----------------------------------------------------------------------------- discriminator
class DACMLP(nn.Module):
    """Adversarial discriminator for one attribute (reference ``DACMLP``, METHOD.md §10).

    Per tapped layer: LayerNorm -> Linear(D, H) -> GELU -> Dropout; mean over layers; then
    Linear(H, 2H) -> GELU -> Dropout -> Linear(2H, K). ``H`` defaults to ``D``.
    """

    def __init__(self, hidden_size: int, num_taps: int, num_classes: int, hidden: Optional[int] = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if num_taps < 1 or num_classes < 2:
            raise ValueError(f"DACMLP: need >= 1 tap and >= 2 classes, got {num_taps}, {num_classes}")
        h = hidden or hidden_size
        self.per_layer = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, h), nn.GELU(), nn.Dropout(dropout))
            for _ in range(num_taps)
        )
        self.head = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * h, num_classes))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.per_layer):
            raise ValueError(f"DACMLP: expected {len(self.per_layer)} tapped features, got {len(feats)}")
        z = torch.stack([blk(f) for blk, f in zip(self.per_layer, feats)], dim=0).mean(dim=0)
        return self.head(z)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``h[B,T,D]`` over ``mask[B,T]`` per row (rows with no token fall back to all tokens)."""
    m = mask.to(h.dtype)
    empty = m.sum(dim=1) == 0
    if empty.any():
        m = torch.where(empty[:, None], torch.ones_like(m), m)
    return (h * m[..., None]).sum(dim=1) / m.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- method objects
@dataclass
class StepOutput:
    """What a method returns for one micro-batch: the loss to backprop and scalar logs."""

    loss: torch.Tensor
    logs: dict = field(default_factory=dict)
    aux: dict = field(default_factory=dict)


def _f(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


class Method:
    """Base: vanilla LoRA (token-mean LM loss). Subclasses add terms and trainable extras."""

    name = "lora"
    uses_sampler = False

    def __init__(self, ce_loss_weight: float = 1.0) -> None:
        self.ce_loss_weight = float(ce_loss_weight)
        self.module: Optional[nn.Module] = None  # trainable extras, wrapped with the model

    def hidden_indices(self, n_hidden_states: int) -> list[int]:
        """Hidden-state indices the forward must capture (none for plain LM training)."""
        return []

    def param_groups(self, base_lr: float) -> list[dict]:
        if self.module is None:
            return []
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": base_lr}]

    def lm_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        loss = token_mean_lm_loss(logits, batch["labels"])
        return loss, {"lm_loss": _f(loss)}

    def compute(self, logits: torch.Tensor, hidden: Mapping[int, torch.Tensor], batch: Mapping[str, Any],
                progress: float, step: int) -> StepOutput:
        """Loss of one micro-batch; ``progress`` = step / total steps, ``step`` = optimizer steps done."""
        lm, logs = self.lm_loss(logits, batch)
        return StepOutput(self.ce_loss_weight * lm, logs)

    def after_forward(self, out: StepOutput, batch: Mapping[str, Any], step: int) -> StepOutput:
        """Work done outside the wrapped forward (alternating DAC step). Default: nothing."""
        return out

    def save_artifacts(self, out_dir: Any) -> None:
        """Method files written beside the adapter in every checkpoint and the run dir (the eraser). Default: none."""


class LoraMethod(Method):
    name = "lora"


class ResampleMethod(Method):
    """Vanilla loss; the trainer swaps in :class:`AttributeBalancedBatchSampler`."""

    name = "resample"
    uses_sampler = True


class ReweightMethod(Method):
    """Per-sample token-mean LM loss times a per-sample group weight (looked up by sample id)."""

    name = "reweight"

    def __init__(self, weights: Mapping[str, float], ce_loss_weight: float = 1.0) -> None:
        super().__init__(ce_loss_weight)
        self.weights = dict(weights)

    def lm_loss(self, logits, batch):
        per, n = per_sample_lm_loss(logits, batch["labels"])
        try:
            w = torch.tensor([self.weights[i] for i in batch["ids"]], dtype=per.dtype, device=per.device)
        except KeyError as e:
            raise KeyError(f"reweight: no weight for sample id {e.args[0]!r}") from None
        has = (n > 0).to(per.dtype)
        loss = (w * per * has).sum() / has.sum().clamp_min(1.0)
        plain = (per * has).sum() / has.sum().clamp_min(1.0)
        return loss, {"lm_loss": _f(plain), "weighted_lm_loss": _f(loss), "mean_weight": _f((w * has).sum() / has.sum().clamp_min(1))}


class FairLLaVAMethod(Method):
    """LM loss + the FairnessRegularizer (DIM + DAC), in ``joint`` or ``alternating`` mode (METHOD.md §5)."""

    name = "fairllava"

    def __init__(self, regularizer: nn.Module, fairness_config: Any, dac_optimizer_factory=None) -> None:
        super().__init__(float(getattr(fairness_config, "ce_loss_weight", 1.0)))
        self.cfg = fairness_config
        self.update_mode = str(getattr(fairness_config, "update_mode", "joint"))
        self.n_dac_steps = int(getattr(fairness_config, "n_dac_steps", 1))
        # joint: heads are wrapped with the model (DDP syncs them); alternating: the heads are
        # stepped by their own optimizer outside the wrapped forward, so they stay outside.
        self.regularizer = regularizer
        self.module = regularizer if self.update_mode == "joint" else None
        self.dac_optimizer: Optional[torch.optim.Optimizer] = None
        self._indices: Optional[list[int]] = None
        # fairness.penalty_grad_clip/ratio: the penalty goes to aux["penalty_loss"] for its own clipping (budget.py)
        self.separate_penalty = bool(getattr(fairness_config, "separate_penalty_budget", False))
        self.strata_by_id: Optional[Mapping[str, int]] = None  # derived strata (mi_strata_source: chexpert_rules)

    def hidden_indices(self, n_hidden_states: int) -> list[int]:
        self._indices = list(self.regularizer.layer_indices(n_hidden_states))
        return self._indices

    def param_groups(self, base_lr: float) -> list[dict]:
        if self.update_mode != "joint":
            return []
        return list(self.regularizer.param_groups(base_lr))

    def make_dac_optimizer(self, lr: float, override: Optional[float] = None) -> torch.optim.Optimizer:
        """The heads' own AdamW (alternating mode): lr = ``override`` (optim.dac_lr) > fairness ``dac_lr`` > ``lr``."""
        dac_lr = override or getattr(self.cfg, "dac_lr", None) or lr
        self.dac_optimizer = torch.optim.AdamW(
            [p for p in self.regularizer.parameters() if p.requires_grad], lr=dac_lr, weight_decay=0.0
        )
        return self.dac_optimizer

    def _strata(self, batch) -> Optional[torch.Tensor]:
        """Conditioning strata: the collated task labels, or ids looked up in ``strata_by_id`` (derived labels)."""
        if self.strata_by_id is None:
            return batch.get("task_labels")
        return torch.tensor([self.strata_by_id.get(i, IGNORE_INDEX) for i in batch["ids"]], dtype=torch.long,
                            device=batch["attention_mask"].device)

    def _labels(self, batch) -> dict:
        """Only the regularised attributes: the data may carry more (e.g. for evaluation or resampling)."""
        return {a: batch["attr_labels"][a] for a in self.regularizer.cfg.attribute_names}

    def compute(self, logits, hidden, batch, progress, step):
        lm, logs = self.lm_loss(logits, batch)
        assert self._indices is not None, "hidden_indices() must be called before compute()"
        states = [hidden[i] for i in self._indices]
        reg = self.regularizer
        mask = reg.select_tokens(batch["attention_mask"], batch["image_mask"])
        if self.update_mode == "joint":
            out = reg(hidden_states=states, token_mask=mask, labels=self._labels(batch), step=step,
                      strata=self._strata(batch))
            logs.update({k: float(v) for k, v in out["logs"].items()})
            logs["fair_loss"] = _f(out["loss"])
            if self.separate_penalty:
                return StepOutput(self.ce_loss_weight * lm + out["dac_term"], logs,
                                  aux={"penalty_loss": out["penalty_loss"]})
            return StepOutput(self.ce_loss_weight * lm + out["loss"], logs)
        z, rows = reg.pool(states, mask)
        return StepOutput(self.ce_loss_weight * lm, logs, aux={"z": z, "rows": rows})

    def after_forward(self, out: StepOutput, batch, step):
        if self.update_mode == "joint":
            return out
        if self.dac_optimizer is None:
            raise RuntimeError("alternating mode: make_dac_optimizer() was not called")
        z, rows = out.aux["z"], out.aux["rows"]
        labels = self._labels(batch)
        dac = self.regularizer.dac_update(z.detach(), labels, self.dac_optimizer, self.n_dac_steps, row_index=rows,
                                          step=step)
        pen = self.regularizer.penalty(z, labels, step=step, row_index=rows, strata=self._strata(batch))
        logs = dict(out.logs)
        for src in (dac.get("logs", {}), pen.get("logs", {})):
            logs.update({k: float(v) for k, v in src.items()})
        logs["fair_loss"] = _f(pen["loss"])
        if self.separate_penalty:
            return StepOutput(out.loss, logs, aux={"penalty_loss": pen["loss"]})
        return StepOutput(out.loss + pen["loss"], logs)


class AdversarialMethod(Method):
    """Adv. MLP classifier baseline: ``w_ce*LM + lambda_fair * sum_a CE(D_a(GRL(z)), y_a)``.

    The discriminator sits *behind* the reversal, so it only ever receives the gradient of its own
    CE; the backbone receives ``-strength`` times it (METHOD.md §12 #3).
    """

    name = "adversarial"

    def __init__(self, hidden_size: int, num_classes: Mapping[str, int], cfg: Any, total_steps: int,
                 class_counts: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        super().__init__(float(cfg.ce_loss_weight))
        self.cfg = cfg
        self.taps = [int(t) for t in cfg.taps]
        self.module = nn.ModuleDict(
            {a: DACMLP(hidden_size, len(self.taps), k, hidden=cfg.hidden, dropout=cfg.dropout)
             for a, k in num_classes.items()}
        )
        end = cfg.fairness_lambda if cfg.grl_end is None else cfg.grl_end
        self.schedule = LinearRampSchedule(cfg.grl_start, end, cfg.ramp_from_frac, cfg.ramp_to_frac)
        self.class_counts = {a: torch.as_tensor(c, dtype=torch.float32) for a, c in (class_counts or {}).items()}
        self.total_steps = max(1, int(total_steps))
        self.pretraining = False
        self._indices: Optional[list[int]] = None

    def hidden_indices(self, n_hidden_states: int) -> list[int]:
        bad = [t for t in self.taps if not -n_hidden_states <= t < n_hidden_states]
        if bad:
            raise ValueError(
                f"adversarial.taps: {bad} out of range for a model with {n_hidden_states} hidden states (0..{n_hidden_states - 1})"
            )
        self._indices = [t % n_hidden_states for t in self.taps]
        return self._indices

    def _mask(self, batch) -> torch.Tensor:
        att = batch["attention_mask"].bool()
        img = batch["image_mask"].bool()
        mode = self.cfg.token_mode
        if mode == "image":
            return img & att
        if mode == "text":
            return att & ~img
        return att

    def _features(self, hidden, batch) -> list[torch.Tensor]:
        mask = self._mask(batch)
        assert self._indices is not None, "hidden_indices() must be called before compute()"
        return [masked_mean(hidden[i].float(), mask) for i in self._indices]

    def _disc_loss(self, feats, labels, strength: Optional[float]) -> tuple[torch.Tensor, dict]:
        total = feats[0].sum() * 0.0
        logs: dict = {}
        for a, disc in self.module.items():
            x = feats if strength is None else [grad_reverse(f, strength) for f in feats]
            logits = disc(x)
            y = labels[a].to(logits.device)
            mode = self.cfg.loss_mode if self.pretraining else "ce"
            ce = dac_loss(logits, y, mode, IGNORE_INDEX, self.class_counts.get(a))
            valid = y != IGNORE_INDEX
            acc = (logits.argmax(-1)[valid] == y[valid]).float().mean() if valid.any() else torch.tensor(float("nan"))
            logs[f"adv_ce/{a}"] = _f(ce)
            logs[f"adv_acc/{a}"] = _f(acc)
            logs[f"n_valid/{a}"] = int(valid.sum())
            total = total + ce
        return total, logs

    def compute(self, logits, hidden, batch, progress, step):
        if self.pretraining:
            feats = [f.detach() for f in self._features(hidden, batch)]
            loss, logs = self._disc_loss(feats, batch["attr_labels"], None)
            return StepOutput(loss, logs)
        lm, logs = self.lm_loss(logits, batch)
        strength = self.schedule(progress)
        adv, dlogs = self._disc_loss(self._features(hidden, batch), batch["attr_labels"], strength)
        logs.update(dlogs)
        logs["grl_strength"] = strength
        return StepOutput(self.ce_loss_weight * lm + self.cfg.fairness_lambda * adv, logs)


def label_counts(values: list[int], num_classes: int) -> torch.Tensor:
    """Training-set class counts (ignore index dropped), for balanced / logit-adjusted losses."""
    c = torch.zeros(num_classes)
    for v in values:
        if v != IGNORE_INDEX:
            c[int(v)] += 1
    return c


__all__ = [
    "GradientReversal", "grad_reverse", "LinearRampSchedule", "per_sample_lm_loss", "token_mean_lm_loss",
    "target_logit_positions", "compact_labels",
    "DACMLP", "masked_mean", "StepOutput", "Method", "LoraMethod", "ResampleMethod",
    "ReweightMethod", "FairLLaVAMethod", "AdversarialMethod", "label_counts",
]
