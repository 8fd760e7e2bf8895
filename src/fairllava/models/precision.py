"""Compute precision: one setting (``auto | float32 | bfloat16 | float16``) for training, generation and audit.

Why a module of its own: the same choice has to be made the same way in three places, and it is a hardware
question. On this project's CPUs (AMX / avx512_bf16) a bf16 matmul runs ~6x faster than fp32, but only when
(a) the frozen weights are *stored* in bf16 (autocast re-casts frozen fp32 weights on every call: its cast cache
only keeps leaf tensors that require grad) and (b) activations stay bf16 between layers (PEFT casts every LoRA
input up to the fp32 adapter dtype unless told not to). So mixed precision here means:

- frozen base weights in the compute dtype, cast once at load time;
- trainable weights (LoRA, projector, method heads) and their optimizer state in fp32 (master weights);
- the model forward under ``torch.autocast`` so the fp32 trainable weights meet bf16 activations in bf16 matmuls
  (their casts are cached per forward); everything after the forward — LM loss, the regulariser's estimate, the
  adversary — in fp32 outside autocast (METHOD.md: the estimate stays fp32).

``auto`` picks bf16 where the device has bf16 matmul support (CUDA with ``is_bf16_supported``, or a CPU with
avx512_bf16 / AMX, detected, not guessed) and fp32 elsewhere.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import FairllavaError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has native bf16 matmul instructions (avx512_bf16 or AMX-BF16).

    Asks torch's own CPU feature probe first (what oneDNN dispatches on); falls back to /proc/cpuinfo flags.
    """
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # AMX-BF16 CPUs all have avx512_bf16 too
    if callable(probe):
        try:
            if probe():
                return True
        except Exception:  # pragma: no cover - private API changed
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:  # pragma: no cover - not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_has_bf16_matmul(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16_matmul()
    return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def canonical_dtype_name(value: str | torch.dtype | None, key: str = "dtype") -> str:
    """``auto`` / ``float32`` / ``bfloat16`` / ``float16`` from a name, alias or torch dtype; else a one-line error."""
    if value is None:
        return "auto"
    if isinstance(value, torch.dtype):
        for name, dt in _TORCH.items():
            if dt == value:
                return name
        raise FairllavaError(f"{key}={value}: expected one of {', '.join(DTYPE_CHOICES)}")
    name = _ALIASES.get(str(value), str(value))
    if name not in DTYPE_CHOICES:
        raise FairllavaError(f"{key}={value!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    return name


_warned_slow: set[str] = set()


def resolve_dtype(value: str | torch.dtype | None, device: torch.device | str | None = None,
                  key: str = "dtype") -> torch.dtype:
    """The compute dtype for ``value`` on ``device`` (``auto``: bf16 where it is fast, fp32 elsewhere).

    An explicit ``bfloat16`` on a device without bf16 matmul still runs (emulated) but warns once that it is slow.
    """
    name = canonical_dtype_name(value, key)
    device = torch.device(device) if device is not None else default_device()
    if name == "auto":
        return torch.bfloat16 if device_has_bf16_matmul(device) else torch.float32
    if name == "bfloat16" and not device_has_bf16_matmul(device) and device.type not in _warned_slow:
        _warned_slow.add(device.type)
        warnings.warn(
            f"{key}=bfloat16 on a {device.type} without bf16 matmul support (no avx512_bf16/AMX): it runs, but "
            "slower than float32; use auto or float32", stacklevel=2,
        )
    return _TORCH[name]


def store_in_compute_dtype(model: nn.Module, compute_dtype: torch.dtype, keep_fp32: nn.Module | None = None) -> None:
    """Cast ``model`` (weights and buffers) to ``compute_dtype`` once, except ``keep_fp32`` (a module that will
    train), which gets fp32 copies of the values it was loaded with, so no trained weight is ever rounded to bf16.

    LayerNorm modules keep fp32 weights too (the values they were loaded with): with ``lora.fp32_sum`` the
    residual stream is fp32, and CPU autocast runs ``layer_norm`` as-is, which accepts an fp32 or bf16 input only
    with fp32 weights. RMSNorm models (Llama, Mistral, Qwen) have none, so for them nothing changes.
    """
    keep = [keep_fp32] if keep_fp32 is not None else []
    if compute_dtype != torch.float32:
        keep += [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    saved = [{k: v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v
              for k, v in mod.state_dict().items()} for mod in keep]
    if any(p.dtype != compute_dtype for p in model.parameters() if p.is_floating_point()):
        model.to(compute_dtype)
    for mod, state in zip(keep, saved):
        mod.float()
        mod.load_state_dict(state)


def training_attention(setting: str, device: torch.device | str) -> str | None:
    """The attention implementation to train with (None = keep the model's own); see ``model.attn_implementation``."""
    if setting == "auto":
        return "eager" if torch.device(device).type == "cpu" else None
    return setting


def keep_trainable_fp32(model: nn.Module) -> int:
    """Cast every trainable parameter to fp32 in place (master weights); returns how many were cast.

    Frozen parameters keep the compute dtype they were loaded in.
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def keep_activations_in_compute_dtype(model: nn.Module) -> int:
    """Stop PEFT from casting each LoRA layer's input up to the fp32 adapter dtype (autocast does the matmul)."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "_cast_input_dtype"):
            mod.cast_input_dtype_enabled = False
            n += 1
    return n


def prepare_for_training(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Mixed-precision layout after LoRA/freezing: fp32 trainables; bf16 activations through LoRA layers."""
    keep_trainable_fp32(model)
    if compute_dtype != torch.float32:
        keep_activations_in_compute_dtype(model)


def prepare_for_inference(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Everything (base, adapter, projector) in the compute dtype: no autocast and no casts while generating."""
    if any(p.dtype != compute_dtype for p in model.parameters() if p.is_floating_point()):
        model.to(compute_dtype)
    return model


def autocast(device: torch.device | str, compute_dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``compute_dtype`` (a no-op context for fp32 / None)."""
    if compute_dtype is None or compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Autocast off: losses and the regulariser's estimate run in fp32 even inside an outer autocast region."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield


__all__ = [
    "DTYPE_CHOICES",
    "autocast",
    "canonical_dtype_name",
    "cpu_has_bf16_matmul",
    "device_has_bf16_matmul",
    "full_precision",
    "keep_activations_in_compute_dtype",
    "keep_trainable_fp32",
    "prepare_for_inference",
    "prepare_for_training",
    "resolve_dtype",
    "store_in_compute_dtype",
    "training_attention",
]
