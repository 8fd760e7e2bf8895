"""A fused forward for PEFT's LoRA layers: the same parameters and adapter files, fewer and larger kernels.

Why: with r = 16 the LoRA branches are three quarters of a stage-2 step's matmul calls, each far too small to
run near the bf16 (AMX) rate, and PEFT adds two full-width elementwise passes per layer (``* scaling`` and
``result +``) plus their backward. Two changes, neither of which changes what is computed:

- ``out = addmm(base(x), A(drop(x)), Bᵀ, alpha=scaling)``: the scale and the residual add ride on the B matmul.
- Siblings that read the *same input tensor* and share its dropout mask (q/k/v, gate/up; see
  ``models/lora_dropout.py``) compute ``drop(x) @ [A_q; A_k; A_v]ᵀ`` as one matmul and take their slices. So
  three A matmuls (and, in backward, three weight-gradient and three input-gradient matmuls plus two adds)
  become one of each.

``fp32_sum`` (the ``lora.fp32_sum`` setting) is the one option that does change values, on purpose. Under bf16 (or
fp16) autocast the sum ``base(x) + scale·B(A(x))`` is rounded to bf16, and early in training, while B is tiny, the LoRA
update is below half a bf16 ulp of the base output and much of it is rounded away: the forward does not see what
the optimizer learned, and bf16's loss curve lags fp32's in the first steps (docs/benchmark.md, "Loss curves").
``"residual"`` sums in fp32 and returns fp32 for the projections that write into the residual stream (o_proj,
down_proj and their namesakes), so the residual stream stays fp32; ``"all"`` does so for every LoRA layer;
``"none"`` keeps the compute dtype; ``"auto"`` (the default of ``lora.fp32_sum``) is ``all`` with the fused
forward and ``none`` without it (PEFT's own forward sums in the compute dtype). Under fp32 compute, and outside
autocast (bf16 inference), every choice computes the same.

Sibling groups are only formed where the layers' dropout is one shared module or off, since independent
masks (PEFT's default) cannot share ``drop(x)``. The identity of the input tensor decides at run time, as
for the shared mask: a sibling called on another tensor computes its own branch. Anything this path does not
cover (merged or disabled adapters, several adapters, DoRA and other variants, ``adapter_names``, a LoRA
dtype differing from the input without autocast) falls back to PEFT's own forward.
"""
from __future__ import annotations

import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# names of projections that read one input tensor, per architecture family
SIBLING_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"w1", "w3"}),
)
_ADAPTER = "default"
# projections whose output is added to the residual stream, per architecture family (see ``fp32_sum``)
RESIDUAL_WRITERS: frozenset[str] = frozenset({"o_proj", "down_proj", "out_proj", "fc2", "w2", "c_proj",
                                              "dense_4h_to_h"})
FP32_SUM_CHOICES = ("auto", "none", "residual", "all")  # auto: all with the fused forward, else none


class LoraGroup:
    """LoRA layers that read one input tensor: one dropout, one A matmul, one cached result per input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.ranks = [int(layer.lora_A[_ADAPTER].weight.shape[0]) for layer in layers]
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self._x: weakref.ref | None = None
        self._key: tuple | None = None
        self._parts: list[torch.Tensor] | None = None
        self._pending: set[int] = set()

    def _weights(self) -> list[torch.Tensor]:
        return [layer.lora_A[_ADAPTER].weight for layer in self.layers]

    def lora_a(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """This layer's ``A(drop(x))``, computed for the whole group on the first call with ``x``."""
        i = self.index[id(layer)]
        weights = self._weights()
        key = (layer.training, torch.is_autocast_enabled(x.device.type), tuple(w._version for w in weights))
        if (self._x is not None and self._x() is x and self._key == key and self._parts is not None
                and i in self._pending):
            self._pending.discard(i)
            part = self._parts[i]
            if not self._pending:
                self._x = self._key = self._parts = None
            return part
        xd = layer.lora_dropout[_ADAPTER](x)
        if len(weights) == 1:
            self._x = self._key = self._parts = None
            return F.linear(xd, weights[0])
        parts = list(F.linear(xd, torch.cat(weights, dim=0)).split(self.ranks, dim=-1))
        self._x, self._key, self._parts = weakref.ref(x), key, parts
        self._pending = set(range(len(weights))) - {i}
        return parts[i]


def _covered(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """True when the fused path computes exactly what PEFT's forward would."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    if list(layer.active_adapters) != [_ADAPTER] or _ADAPTER in getattr(layer, "lora_variant", {}):
        return False
    if layer.lora_B[_ADAPTER].bias is not None or not isinstance(layer.get_base_layer(), nn.Linear):
        return False
    if x.dtype != layer.lora_A[_ADAPTER].weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return False
    return True


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not _covered(self, x, args, kwargs):
        return self._fairllava_peft_forward(x, *args, **kwargs)
    base = self.base_layer(x)
    xa = self._fairllava_group.lora_a(self, x)
    b = self.lora_B[_ADAPTER].weight
    scale = float(self.scaling[_ADAPTER])
    # only under autocast: without it (inference in bf16) the next layer would meet an fp32 input it cannot take
    if self._fairllava_fp32_sum and base.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):  # the update is not rounded into a bf16 base output
            out = torch.addmm(base.reshape(-1, base.shape[-1]).float(), xa.reshape(-1, xa.shape[-1]).float(),
                              b.float().t(), alpha=scale)
        return out.view(base.shape)
    out = torch.addmm(base.reshape(-1, base.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(), alpha=scale)
    return out.view(base.shape).to(base.dtype)


def _is_lora_linear(mod: nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear as LoraLinear

    return isinstance(mod, LoraLinear) and _ADAPTER in mod.lora_A


def _siblings(children: dict[str, nn.Module]) -> list[list[nn.Module]]:
    """Groups among one parent's LoRA children: named siblings sharing their dropout module; the rest alone."""
    groups: list[list[nn.Module]] = []
    grouped: set[str] = set()
    for names in SIBLING_NAMES:
        present = [n for n in sorted(names) if n in children]
        if len(present) < 2:
            continue
        mods = [children[n] for n in present]
        drops = [m.lora_dropout[_ADAPTER] for m in mods]
        same_in = len({m.get_base_layer().in_features for m in mods}) == 1
        shared = all(d is drops[0] for d in drops) or all(isinstance(d, nn.Identity) for d in drops)
        if same_in and shared:
            order = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1,
                     "query": 0, "key": 1, "value": 2, "w1": 0, "w3": 1}
            groups.append(sorted(mods, key=lambda m: order[next(n for n, c in children.items() if c is m)]))
            grouped.update(present)
    groups.extend([m] for n, m in children.items() if n not in grouped)
    return groups


def fuse_lora(peft_model: nn.Module, fp32_sum: str = "auto") -> int:
    """Give every vanilla LoRA Linear of ``peft_model`` the fused forward; returns how many layers changed.

    ``fp32_sum``: ``auto`` (= ``all`` here) / ``none`` / ``residual`` / ``all`` (module docstring). Idempotent.
    Parameters, names and the saved adapter are untouched (PEFT saves and loads it as before).
    """
    if fp32_sum not in FP32_SUM_CHOICES:
        raise ValueError(f"fp32_sum={fp32_sum!r}: expected one of {', '.join(FP32_SUM_CHOICES)}")
    fp32_sum = "all" if fp32_sum == "auto" else fp32_sum
    n = 0
    for parent in peft_model.modules():
        children = {name: m for name, m in parent.named_children()
                    if _is_lora_linear(m) and not hasattr(m, "_fairllava_group")}
        if not children:
            continue
        names = {id(m): name for name, m in children.items()}
        for layers in _siblings(children):
            group = LoraGroup(layers)
            for layer in layers:
                layer._fairllava_fp32_sum = fp32_sum == "all" or (fp32_sum == "residual"
                                                                  and names[id(layer)] in RESIDUAL_WRITERS)
                layer._fairllava_group = group
                layer._fairllava_peft_forward = layer.forward
                layer.forward = types.MethodType(_fused_forward, layer)
                n += 1
    return n


def unfuse_lora(peft_model: nn.Module) -> int:
    """Undo :func:`fuse_lora` (PEFT's own forward again); returns how many layers changed."""
    n = 0
    for mod in peft_model.modules():
        if hasattr(mod, "_fairllava_group"):
            mod.forward = mod._fairllava_peft_forward
            del mod._fairllava_group, mod._fairllava_peft_forward, mod._fairllava_fp32_sum
            n += 1
    return n


__all__ = ["FP32_SUM_CHOICES", "LoraGroup", "RESIDUAL_WRITERS", "SIBLING_NAMES", "fuse_lora", "unfuse_lora"]
