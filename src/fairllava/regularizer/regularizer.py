"""``FairnessRegularizer``: DAC heads + CLUB penalty, architecture-agnostic (it only sees hidden states).

Why a plug-in: the method needs nothing from the model but hidden states of one or more layers, a token mask and
per-attribute labels, so the same module serves any HF causal LM / VLM and the trainer stays generic.

Gradient routing (METHOD.md §5): the DAC loss is computed on ``z.detach()`` so it reaches the heads only; the MI
penalty is computed with ``torch.func.functional_call`` on detached head parameters so it reaches the model only.
``joint`` mode does both in one backward (reference); ``alternating`` mode (paper Algorithm 1) first updates the
heads with their own optimizer (``dac_update``) and then returns the penalty under frozen heads (``penalty``):
the updated ones (``alternating_penalty_heads: same_batch``, today) or a snapshot taken before this batch's update
(``held_out``), so the penalty is scored by heads fitted on other data (the previous micro-batches).

The heads always run in fp32 with autocast off (z is cast to float32 first), so the estimate stays fp32 when the
model runs in bf16. Every call also records the heads' predictions on the batch *before* they train on it, for
the held-out balanced accuracy ``dac_bacc/*`` and the dead-DAC check (health.py).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .club import check_labels, club_mi
from .config import FairnessConfig, check_class_counts
from .distributed import all_gather_labels, all_gather_with_grad, is_distributed
from .health import DACHealth
from .heads import build_head, dac_loss
from .pooling import pool as _pool
from .pooling import select_tokens as _select_tokens
from .queue import LabelQueue

_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")
_HEADS = re.compile(r"(?:^|\.)heads\.")
_STATS = ("z_mean", "z_var", "z_batches")  # running standardisation buffers (mi_standardize)
_SUBMODULES = ("health.", "queue.")  # DAC-health window and label queue: buffers kept under their own prefix


class FairnessRegularizer(nn.Module):
    """One DAC head per attribute and the CLUB-based penalty of METHOD.md §3–8.

    ``out = reg(hidden_states, token_mask, labels, step)`` returns ``loss`` =
    ``fairness_lambda * (w * sum_a lambda_a DIM_a + dac_loss_weight * sum_a DAC_a)`` where ``w`` is 0 during the
    DAC warm-up and 1 after; add ``ce_loss_weight * lm_loss`` yourself.
    """

    def __init__(self, cfg: FairnessConfig | Mapping[str, Any] | None, hidden_size: int):
        super().__init__()
        if cfg is None:
            cfg = FairnessConfig()
        elif isinstance(cfg, Mapping):
            cfg = FairnessConfig.from_dict(cfg)
        elif not isinstance(cfg, FairnessConfig):
            raise ValueError(f"cfg must be a FairnessConfig or a mapping, got {type(cfg).__name__}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.heads = nn.ModuleDict(
            {name: build_head(hidden_size, spec.num_classes, cfg.dac_hidden_size) for name, spec in cfg.attributes.items()}
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        if cfg.mi_standardize:
            # Why: mid-layer LM states have a few huge outlier dimensions; raw or L2-normalised, they leave a linear
            # DAC at chance for a whole short run (docs/benchmark.md), so the penalty is ~0 whatever lambda is.
            # A fixed (no-gradient) affine map keeps every direction, norm included, and conditions the heads.
            self.register_buffer("z_mean", torch.zeros(hidden_size))
            self.register_buffer("z_var", torch.ones(hidden_size))
            self.register_buffer("z_batches", torch.zeros((), dtype=torch.long))
        self._class_counts: dict[str, torch.Tensor] = {}
        if cfg.dac_class_counts:
            self.set_class_counts(cfg.dac_class_counts)
        self._auto_step = 0
        self.health = DACHealth({n: a.num_classes for n, a in cfg.attributes.items()}, cfg.dac_health_window,
                                cfg.ignore_index)
        self.queue = LabelQueue(cfg.attribute_names, cfg.queue_size, cfg.ignore_index) if cfg.queue_size else None
        self._held_out_params: dict[str, dict[str, torch.Tensor]] | None = None  # alternating held_out snapshot

    # ------------------------------------------------------------------ configuration helpers
    def set_class_counts(self, counts: Mapping[str, Sequence[float]]) -> None:
        """Training-set class counts per attribute, needed by the ``balanced`` / ``logit_adjusted`` DAC losses."""
        for name, c in counts.items():
            c = check_class_counts(name, list(c), self.cfg.attributes)
            self._class_counts[name] = torch.tensor(c, dtype=torch.float32)

    def layer_indices(self, n_hidden_states: int) -> list[int]:
        """Hidden-state indices to tap (HF ``output_hidden_states`` convention, ``n_hidden_states`` = L + 1)."""
        if isinstance(n_hidden_states, bool) or not isinstance(n_hidden_states, int) or n_hidden_states < 1:
            raise ValueError(f"n_hidden_states must be a positive integer, got {n_hidden_states!r}")
        idx = self.cfg.mi_layer_index
        if idx is None:
            frac = self.cfg.mi_layer_frac
            return [int(n_hidden_states * frac) if frac < 1.0 else n_hidden_states - 1]
        out = []
        for i in idx if isinstance(idx, list) else [idx]:
            if not -n_hidden_states <= i < n_hidden_states:
                raise ValueError(
                    f"mi_layer_index={i} is past the model depth: expected 0..{n_hidden_states - 1} "
                    f"(or -{n_hidden_states}..-1) for n_hidden_states={n_hidden_states}"
                )
            out.append(i % n_hidden_states)
        if len(set(out)) != len(out):
            raise ValueError(f"mi_layer_index={idx} names the same layer twice for n_hidden_states={n_hidden_states}")
        return out

    def select_tokens(self, attention_mask: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """Bool [B, T] mask of the positions pooled into z (never padding; ≥1 per row or ValueError)."""
        return _select_tokens(attention_mask, image_mask, self.cfg.mi_token_mode, self.cfg.mi_drop_bos_eos)

    def pool(self, hidden_states: Any, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z [N, D], row_index [N])``; several layers are averaged position-wise (same sampled tokens)."""
        hs = _as_list(hidden_states)
        if hs and hs[0].dim() == 3 and hs[0].shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states have size {hs[0].shape[-1]} but the regulariser was built for "
                             f"hidden_size={self.hidden_size}")
        return _pool(
            hs, token_mask, self.cfg.mi_pooling, self.cfg.l2_normalize, self.generator, self.cfg.mi_max_tokens_per_sample
        )

    def penalty_weight(self, step: int | None) -> float:
        """0 before ``dac_warmup_steps`` (the DAC learns first), 1 after."""
        return 0.0 if step is not None and step < self.cfg.dac_warmup_steps else 1.0

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer group for the heads: ``dac_lr`` if set, else ``base_lr``; no weight decay (reference wd 0)."""
        lr = self.cfg.dac_lr if self.cfg.dac_lr is not None else base_lr
        return [{"params": [p for p in self.heads.parameters()], "lr": lr, "weight_decay": 0.0, "name": "dac_heads"}]

    def num_head_parameters(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())

    def extra_repr(self) -> str:
        return (
            f"attributes={self.cfg.attribute_names}, hidden_size={self.hidden_size}, "
            f"dac_parameters={self.num_head_parameters():,}, update_mode={self.cfg.update_mode!r}, "
            f"pooling={self.cfg.mi_pooling!r}, tokens={self.cfg.mi_token_mode!r}"
        )

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load heads saved from this module, a DDP/compiled wrapper (``module.``), or the bare ``heads`` dict."""
        fixed = {}
        for k, v in state_dict.items():
            k = _PREFIX.sub("", k)
            sub = next((p for p in _SUBMODULES if p in k), None)
            if sub is not None:
                fixed[sub + k.split(sub, 1)[1]] = v
                continue
            if k.rsplit(".", 1)[-1] in _STATS:
                fixed[k.rsplit(".", 1)[-1]] = v
                continue
            m = _HEADS.search(k)
            k = "heads." + k[m.end():] if m else "heads." + k
            fixed[k] = v
        # The health window and the label queue are run-time state, not part of a heads file: keep ours if absent.
        for k, v in super().state_dict().items():
            if k.startswith(_SUBMODULES) and k not in fixed:
                fixed[k] = v
        return super().load_state_dict(fixed, strict=strict, assign=assign)

    # ------------------------------------------------------------------ labels
    def _row_labels(
        self, labels: Mapping[str, torch.Tensor], n_rows: int, row_index: torch.Tensor | None, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Validate per-sample labels (exactly the configured attributes, range-checked) and expand them to rows."""
        if not isinstance(labels, Mapping):
            raise ValueError(f"labels must be a dict {{attribute: LongTensor[B]}}, got {type(labels).__name__}")
        names = self.cfg.attribute_names
        for name in labels:
            if name not in self.cfg.attributes:
                raise ValueError(f"labels: unknown attribute {name!r}; configured attributes: {names}")
        out = {}
        for name in names:
            if name not in labels:
                raise ValueError(f"labels: missing attribute {name!r} (use ignore_index={self.cfg.ignore_index} "
                                 f"for unknown values); configured attributes: {names}")
            y = labels[name]
            if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(f"labels[{name!r}] must be an integer tensor of shape [B], got "
                                 f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
            if y.shape[0] != n_rows:
                raise ValueError(f"labels[{name!r}] has {y.shape[0]} entries, expected {n_rows} (one per sample)")
            check_labels(y, self.cfg.attributes[name].num_classes, self.cfg.ignore_index, f"labels[{name!r}]")
            y = y.to(device=device, dtype=torch.long)
            out[name] = y[row_index.to(device)] if row_index is not None else y
        return out

    def _row_strata(self, strata: torch.Tensor | None, n_rows: int, row_index: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor | None:
        """Per-sample task labels for the conditional estimate, expanded to rows like the attribute labels."""
        if not self.cfg.mi_conditional:
            return None
        if strata is None:
            raise ValueError("strata: mi_conditional=True needs the task label of every sample "
                             "(LongTensor[B], ignore_index for unknown); the records need a 'label' field")
        if not isinstance(strata, torch.Tensor) or strata.dim() != 1 or strata.shape[0] != n_rows:
            raise ValueError(f"strata must be an integer tensor of shape [B] = [{n_rows}], got "
                             f"{tuple(getattr(strata, 'shape', ()))}")
        strata = strata.to(device=device, dtype=torch.long)
        return strata[row_index.to(device)] if row_index is not None else strata

    def _groups(self, rows: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
        """Sample id of every row (token pooling gives several rows per sample)."""
        return rows.to(device) if rows is not None else torch.arange(n_rows, device=device)

    def _gather(self, z: torch.Tensor, y: dict[str, torch.Tensor], s: torch.Tensor | None = None,
                g: torch.Tensor | None = None):
        if not self.cfg.gather_across_ranks or not is_distributed():
            return z, y, s, g
        if s is not None:
            y = {**y, "__strata__": s}
        if g is not None:  # sample ids made unique across ranks: (local id, rank) -> id * world + rank
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            y = {**y, "__groups__": g * world + rank}
        z, y = all_gather_with_grad(z), all_gather_labels(y)
        return z, y, y.pop("__strata__", None), y.pop("__groups__", None)

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self._auto_step
            self._auto_step += 1
        return step

    # ------------------------------------------------------------------ standardisation
    @torch.no_grad()
    def observe(self, z: torch.Tensor) -> None:
        """Fold a batch's per-dimension moments into the running statistics (training mode, mi_standardize)."""
        if not self.cfg.mi_standardize or not self.training or z.shape[0] == 0:
            return
        z = z.detach().float()
        n = int(self.z_batches)
        w = max(1.0 / (n + 1), self.cfg.mi_standardize_momentum)
        self.z_mean.lerp_(z.mean(dim=0).to(self.z_mean), w)
        self.z_var.lerp_(z.var(dim=0, unbiased=False).to(self.z_var), w)
        self.z_batches += 1

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - mean) / sqrt(var + 1e-5)`` with the running statistics (identity when mi_standardize is off)."""
        if not self.cfg.mi_standardize:
            return z
        return (z - self.z_mean.to(z)) * torch.rsqrt(self.z_var.to(z) + 1e-5)

    # ------------------------------------------------------------------ terms
    def _head_logits(self, name: str, z: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Head output in fp32 with autocast off: the estimate must not be computed in bf16 (METHOD.md §4)."""
        head = self.heads[name]
        if params is None:
            params = dict(head.named_parameters())
        params = {k: v.float() for k, v in params.items()}  # no-op (same tensor) for fp32 heads
        with torch.autocast(device_type=z.device.type, enabled=False):
            return functional_call(head, params, (self.standardize(z.float()),))

    def _dac_terms(self, z: torch.Tensor, y: dict[str, torch.Tensor], keep: torch.Tensor | None = None,
                   record: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DAC loss on detached z (reaches the heads only) and its diagnostics.

        ``record``: these logits come from heads that have not trained on the batch yet, so their predictions
        (one row per sample, ``keep``) go to the held-out health window.
        """
        cfg = self.cfg
        total = z.new_zeros((), dtype=torch.float32)
        stats: dict[str, torch.Tensor] = {}
        zd = z.detach()
        preds = {}
        for name in self.heads:
            logits = self._head_logits(name, zd)
            ya = y[name]
            preds[name] = logits.detach().argmax(dim=-1)
            counts = self._class_counts.get(name)
            loss = dac_loss(logits, ya, cfg.dac_loss, cfg.ignore_index, counts,
                            cfg.dac_focal_gamma, cfg.dac_balanced_beta, cfg.dac_logit_adjust_tau)
            total = total + loss
            with torch.no_grad():
                valid = ya != cfg.ignore_index
                n = valid.sum()
                correct = ((logits.argmax(dim=-1) == ya) & valid).sum()
                stats[f"dac_ce/{name}"] = dac_loss(logits, ya, "ce", cfg.ignore_index)
                if cfg.dac_loss != "ce":
                    stats[f"dac_loss/{name}"] = loss.detach()
                stats[f"dac_acc/{name}"] = torch.where(n > 0, correct / n.clamp(min=1), torch.nan)
        if record and self.training:
            self.health.record(preds, y, keep)
            stats.update(self.health.stats())
        return total, stats

    def _dim_terms(self, z: torch.Tensor, y: dict[str, torch.Tensor], strata: torch.Tensor | None = None,
                   groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted DIM penalty under detached head parameters (reaches the model only)."""
        cfg = self.cfg
        total = z.new_zeros((), dtype=torch.float32)
        stats: dict[str, torch.Tensor] = {}
        snapshot, self._held_out_params = self._held_out_params, None
        for name, head in self.heads.items():
            params = snapshot[name] if snapshot is not None else {k: v.detach() for k, v in head.named_parameters()}
            logits = self._head_logits(name, z, params)
            ya = y[name]
            q = self.queue
            mi = club_mi(logits, ya, cfg.negatives, cfg.ignore_index, strata=strata,
                         groups=groups if cfg.negatives == "other_samples" else None,
                         partner_labels=q.partners(name) if q is not None else None,
                         partner_strata=q.strata if q is not None and strata is not None else None,
                         skip_single_group_strata=cfg.mi_skip_single_group_strata)
            if cfg.mi_penalty == "smooth_abs":
                dim = torch.sqrt(mi * mi + cfg.mi_penalty_eps)
            elif cfg.mi_penalty == "relu":
                dim = F.relu(mi)
            else:
                dim = mi
            total = total + cfg.attributes[name].weight * dim
            n = (ya != cfg.ignore_index).sum()
            stats[f"mi/{name}"] = mi.detach()
            stats[f"dim/{name}"] = dim.detach()
            stats[f"n_valid/{name}"] = n
            stats[f"skipped/{name}"] = (n < 2).float()
        return total, stats

    # ------------------------------------------------------------------ public steps
    def forward(
        self,
        hidden_states: Any,
        token_mask: torch.Tensor,
        labels: Mapping[str, torch.Tensor],
        step: int | None = None,
        strata: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Joint mode: one call, one backward. Returns ``loss``, ``dim_loss``, ``dac_loss`` (tensors) and ``logs``.

        ``step`` is the optimizer step (for the DAC warm-up); ``None`` counts calls instead. ``strata`` ([B]
        task labels, -100 = unknown) is required when ``mi_conditional`` is on.
        """
        if self.cfg.update_mode != "joint":
            raise ValueError("update_mode='alternating': call dac_update(z.detach(), ...) then penalty(z, ...) "
                             "instead of forward()")
        step = self._resolve_step(step)
        z, rows = self.pool(hidden_states, token_mask)
        y = self._row_labels(labels, token_mask.shape[0], rows, z.device)
        s = self._row_strata(strata, token_mask.shape[0], rows, z.device)
        g = self._groups(rows, z.shape[0], z.device)
        z, y, s, g = self._gather(z, y, s, g)
        self.observe(z)
        dac_total, dac_stats = self._dac_terms(z, y, keep=_first_rows(g, self.cfg.mi_pooling), record=True)
        dim_total, dim_stats = self._dim_terms(z, y, s, g)
        self._after_estimate(y, s, step)
        w = self.penalty_weight(step)
        dim_term = dim_total if w > 0 else dim_total.detach() * 0.0
        lam = self.cfg.fairness_lambda
        loss = lam * (dim_term + self.cfg.dac_loss_weight * dac_total)
        logs = _to_floats({**dim_stats, **dac_stats, "dim_loss": dim_total.detach(), "dac_loss": dac_total.detach()})
        logs.update({"penalty_weight": w, "n_samples": float(z.shape[0])})
        # penalty_loss / dac_term: the two parts of `loss`, for a separate gradient budget (budget.py)
        return {"loss": loss, "dim_loss": dim_total, "dac_loss": dac_total, "logs": logs,
                "penalty_loss": lam * dim_term, "dac_term": lam * (self.cfg.dac_loss_weight * dac_total)}

    def _after_estimate(self, y: dict[str, torch.Tensor], s: torch.Tensor | None, step: int) -> None:
        """Training only: the batch's labels join the negatives queue (after it was scored); the health check."""
        if not self.training:
            return
        if self.queue is not None:
            self.queue.push(y, s)
        self.health.maybe_check(step, self.cfg)

    def dac_update(
        self,
        z_detached: torch.Tensor,
        labels: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        n_steps: int | None = None,
        row_index: torch.Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Any]:
        """Alternating mode, step 1: ``n_steps`` (default ``n_dac_steps``) updates of the heads on detached z.

        ``optimizer`` must hold only head parameters (it is zeroed here, which would wipe model gradients).
        ``labels`` are per sample ([B], pass ``row_index`` from ``pool``) or per row ([N]). The loss is the plain
        sum over attributes: the heads have their own optimizer, so global weights would only rescale it.
        """
        head_ids = {id(p) for p in self.heads.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in head_ids:
                    raise ValueError("dac_update: optimizer holds parameters that are not DAC head parameters; "
                                     "give the heads their own optimizer (reg.param_groups(lr))")
        n_steps = self.cfg.n_dac_steps if n_steps is None else n_steps
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
        z = z_detached.detach()
        n_rows = z.shape[0] if row_index is None else _n_samples(labels)
        y = self._row_labels(labels, n_rows, row_index, z.device)
        g = self._groups(row_index, z.shape[0], z.device)
        z, y, _, g = self._gather(z, y, None, g)
        self.observe(z)
        if self.cfg.alternating_penalty_heads == "held_out":
            # penalty() of this batch must use the heads as they were before training on it (cloned: the
            # optimizer updates the parameters in place, which would corrupt the penalty's saved tensors)
            self._held_out_params = {n: {k: v.detach().clone() for k, v in h.named_parameters()}
                                     for n, h in self.heads.items()}
        first_stats: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            for i in range(n_steps):
                optimizer.zero_grad(set_to_none=True)
                total, stats = self._dac_terms(z, y, keep=_first_rows(g, self.cfg.mi_pooling), record=i == 0)
                total.backward()
                optimizer.step()
                if i == 0:
                    first_stats = {**stats, "dac_loss": total.detach()}
        if self.training:
            self.health.maybe_check(self._auto_step if step is None else step, self.cfg)
        return {"logs": _to_floats(first_stats)}

    def penalty(
        self,
        z: torch.Tensor,
        labels: Mapping[str, torch.Tensor],
        step: int | None = None,
        row_index: torch.Tensor | None = None,
        strata: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Alternating mode, step 2: ``loss = fairness_lambda * w * sum_a lambda_a DIM_a`` with the heads frozen."""
        step = self._resolve_step(step)
        n_rows = z.shape[0] if row_index is None else _n_samples(labels)
        y = self._row_labels(labels, n_rows, row_index, z.device)
        s = self._row_strata(strata, n_rows, row_index, z.device)
        g = self._groups(row_index, z.shape[0], z.device)
        z, y, s, g = self._gather(z, y, s, g)
        dim_total, stats = self._dim_terms(z, y, s, g)
        if self.training and self.queue is not None:
            self.queue.push(y, s)
        w = self.penalty_weight(step)
        dim_term = dim_total if w > 0 else dim_total.detach() * 0.0
        logs = _to_floats({**stats, "dim_loss": dim_total.detach()})
        logs.update({"penalty_weight": w, "n_samples": float(z.shape[0])})
        return {"loss": self.cfg.fairness_lambda * dim_term, "dim_loss": dim_total, "logs": logs}


def _as_list(hidden_states: Any) -> list[torch.Tensor]:
    if isinstance(hidden_states, torch.Tensor):
        return [hidden_states]
    if isinstance(hidden_states, Mapping):
        return [hidden_states[k] for k in sorted(hidden_states)]
    if isinstance(hidden_states, Iterable):
        return list(hidden_states)
    raise ValueError(f"hidden_states must be a tensor, a list of tensors or a dict {{index: tensor}}, "
                     f"got {type(hidden_states).__name__}")


def _first_rows(groups: torch.Tensor, pooling: str) -> torch.Tensor | None:
    """First row of each sample (rows of a sample are contiguous): one health-window entry per sample.

    None (keep every row, no masked indexing, hence no device sync) when pooling gives one row per sample.
    """
    if pooling != "token":
        return None
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep[1:] = groups[1:] != groups[:-1]
    return keep


def _n_samples(labels: Mapping[str, torch.Tensor]) -> int:
    for y in labels.values():
        if isinstance(y, torch.Tensor) and y.dim() == 1:
            return y.shape[0]
    raise ValueError("labels must contain [B] integer tensors")


def _to_floats(stats: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """One device sync for all diagnostics."""
    if not stats:
        return {}
    keys = list(stats)
    values = torch.stack([torch.as_tensor(stats[k]).detach().float().reshape(()) for k in keys]).cpu().tolist()
    return dict(zip(keys, values))
