"""The wrapped training forward: model + method extras in one module, precision, compact logits, hidden states.

Why its own module: the GPU check, the benchmarks and the tests drive exactly this forward without the trainer's
loop, data order or checkpoints (trainer.py re-exports every name for older imports).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.nn as nn

from ..errors import FairllavaError
from .methods import Method, compact_labels, target_logit_positions

_BATCH_META = ("labels", "image_mask", "attr_labels", "ids", "references", "weight", "weights", "task_labels")


# ----------------------------------------------------------------------------- the wrapped forward
def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes ``logits_to_keep`` (HF causal LMs and VLMs do)."""
    from ..models.loading import unwrap_model

    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def lm_forward(model: nn.Module, inputs: dict, labels: Optional[torch.Tensor], compact: bool):
    """``(output, labels)``; with ``compact`` the LM head runs only where the loss reads it.

    The returned labels are aligned with ``output.logits`` so the LM losses apply unchanged (their usual
    shift-by-one); without ``compact`` they are the input labels.
    """
    if compact and labels is not None:
        keep = target_logit_positions(labels)
        return model(**inputs, use_cache=False, logits_to_keep=keep), compact_labels(labels, keep)
    return model(**inputs, use_cache=False), labels


class TrainingModule(nn.Module):
    """Model + method extras in one module, so DDP/FSDP wrap and synchronise them together."""

    def __init__(self, model: nn.Module, method: Method, indices: list[int], compact_logits: bool = False,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.extras = method.module if method.module is not None else nn.Module()
        self._method = [method]  # not a submodule (alternating heads must stay outside DDP)
        self.indices = list(indices)
        self.compact_logits = bool(compact_logits) and accepts_logits_to_keep(model)
        # The model forward autocasts to this dtype; the method's losses (LM CE, regulariser, adversary) run in
        # fp32 outside autocast on fp32 copies of the logits and captured states (models/precision.py).
        self.compute_dtype = compute_dtype

    def forward(self, batch: dict, progress: float, step: int, pretrain: bool = False):
        from ..models.hidden_states import HiddenStateCapture
        from ..models.precision import autocast, full_precision

        method = self._method[0]
        inputs = {k: v for k, v in batch.items() if k not in _BATCH_META and isinstance(v, torch.Tensor)}
        ctx_grad = torch.no_grad() if pretrain else contextlib.nullcontext()
        ctx_lora = self.model.disable_adapter() if pretrain and hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        compact = self.compact_logits and not pretrain
        hidden: dict[int, torch.Tensor] = {}
        device = inputs["input_ids"].device
        with ctx_grad, ctx_lora, autocast(device, self.compute_dtype):
            if self.indices:
                with HiddenStateCapture(self.model, self.indices) as cap:
                    out, labels = lm_forward(self.model, inputs, batch.get("labels"), compact)
                hidden = dict(cap.states)
            else:
                out, labels = lm_forward(self.model, inputs, batch.get("labels"), compact)
        if labels is not batch.get("labels"):
            batch = {**batch, "labels": labels}
        with full_precision(device):
            hidden = {k: v.float() for k, v in hidden.items()}
            res = method.compute(out.logits.float(), hidden, batch, progress, step)
        return res.loss, res.logs, res.aux


# ----------------------------------------------------------------------------- helpers
def _active_projector(model: nn.Module) -> nn.Module:
    """The projector module that trains (PEFT's ``modules_to_save`` copy when wrapped)."""
    from ..models.loading import projector_module_name, unwrap_model

    base = unwrap_model(model)
    name = projector_module_name(base)
    if name is None:
        raise FairllavaError(f"model {type(base).__name__}: no multimodal projector found")
    mod = base.get_submodule(name)
    mts = getattr(mod, "modules_to_save", None)
    if isinstance(mts, nn.ModuleDict) and len(mts):
        return mts["default"] if "default" in mts else next(iter(mts.values()))
    return mod


def _n_hidden_states(model: nn.Module) -> int:
    from ..models.hidden_states import decoder_layers

    return len(decoder_layers(model).layers) + 1


def _hidden_size(model: nn.Module) -> int:
    from ..models.loading import unwrap_model

    cfg = unwrap_model(model).config
    tc = getattr(cfg, "text_config", None) or cfg
    return int(tc.hidden_size)


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif isinstance(v, dict):
            out[k] = {a: t.to(device) if isinstance(t, torch.Tensor) else t for a, t in v.items()}
        else:
            out[k] = v
    return out
