"""The fitted eraser as a fixed layer on the projector's input, and its file beside the adapter.

Why a forward pre-hook on the projector: the projector's input is the frozen vision tower's output, the place the
eraser was fitted (:mod:`fairllava.erasure.fit`). A hook needs no change to the model class, survives PEFT's
``modules_to_save`` wrapper (it sits on the module at the projector's path, whichever copy is active) and is the
same code in training, generation, the audit and a merged model folder.

Why fp32: LEACE's oblique projection mixes all feature dimensions; in bf16 the rounding of the product leaves a
readable trace of the attribute. The layer casts its input to fp32 and its output back to the input dtype.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import FairllavaError

ERASER_FILE = "erasure.safetensors"
HOOK_POINT = "projector_input"
_SLOT = "_fairllava_eraser"  # kept in the projector module's __dict__: never a submodule, never in a state dict


class FeatureEraser(nn.Module):
    """``x -> x - ((x - bias) @ proj_right.T) @ proj_left.T``: LEACE's affine map, stored as a rank-r update.

    ``proj_left`` is ``[d, r]``, ``proj_right`` ``[r, d]``, ``bias`` ``[d]`` (the fit data's mean), exactly
    :class:`concept_erasure.LeaceEraser`'s fields; buffers, so the map never trains.
    """

    def __init__(self, proj_left: torch.Tensor, proj_right: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        d = int(bias.shape[-1])
        if bias.dim() != 1 or proj_left.dim() != 2 or proj_right.dim() != 2 or proj_left.shape[0] != d \
                or proj_right.shape[1] != d or proj_left.shape[1] != proj_right.shape[0]:
            raise FairllavaError(
                f"eraser: inconsistent shapes proj_left {tuple(proj_left.shape)}, proj_right {tuple(proj_right.shape)}, "
                f"bias {tuple(bias.shape)} (expected [d, r], [r, d], [d])"
            )
        self.register_buffer("proj_left", proj_left.detach().float().contiguous())
        self.register_buffer("proj_right", proj_right.detach().float().contiguous())
        self.register_buffer("bias", bias.detach().float().contiguous())

    @classmethod
    def from_leace(cls, eraser: Any, tol: float = 0.0) -> "FeatureEraser":
        """From a ``concept_erasure.LeaceEraser``; rank-1 terms whose factors are all zero (truncated) are dropped."""
        left, right = eraser.proj_left.detach(), eraser.proj_right.detach()
        keep = (left.abs().amax(dim=0) > tol) & (right.abs().amax(dim=1) > tol)
        bias = eraser.bias if eraser.bias is not None else torch.zeros(left.shape[0], dtype=left.dtype)
        return cls(left[:, keep], right[keep, :], bias)

    @property
    def dim(self) -> int:
        return int(self.bias.shape[0])

    @property
    def rank(self) -> int:
        return int(self.proj_left.shape[1])

    def matrix(self) -> torch.Tensor:
        """The linear part ``I - proj_left @ proj_right`` ([d, d], fp32)."""
        return torch.eye(self.dim, device=self.bias.device) - self.proj_left @ self.proj_right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise FairllavaError(f"eraser: features of width {x.shape[-1]}, but the eraser was fitted on width {self.dim}")
        if self.bias.device != x.device:
            self.to(x.device)
        x32 = x.float()
        out = x32 - ((x32 - self.bias) @ self.proj_right.T) @ self.proj_left.T
        return out.to(x.dtype)


# ----------------------------------------------------------------------------- the hook
def _projector(model: nn.Module) -> nn.Module:
    from ..models.loading import projector_module_name, unwrap_model

    base = unwrap_model(model)
    name = projector_module_name(base)
    if name is None:
        raise FairllavaError(f"model {type(base).__name__}: no multimodal projector found to put the eraser in front of")
    return base.get_submodule(name)


def _first_tensor(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    raise FairllavaError("eraser: the projector was called without a feature tensor")


def attach_eraser(model: nn.Module, eraser: FeatureEraser) -> None:
    """Apply ``eraser`` to the projector's input on every forward (replacing an eraser already attached)."""
    detach_eraser(model)
    proj = _projector(model)

    def hook(module, args, kwargs):
        where, x = _first_tensor(args, kwargs)
        if where == 0:
            return (eraser(x),) + tuple(args[1:]), kwargs
        return args, {**kwargs, where: eraser(x)}

    handle = proj.register_forward_pre_hook(hook, with_kwargs=True)
    proj.__dict__[_SLOT] = (eraser, handle)


def detach_eraser(model: nn.Module) -> Optional[FeatureEraser]:
    """Remove the attached eraser (returned), if any."""
    proj = _projector(model)
    slot = proj.__dict__.pop(_SLOT, None)
    if slot is None:
        return None
    slot[1].remove()
    return slot[0]


def attached_eraser(model: nn.Module) -> Optional[FeatureEraser]:
    """The eraser applied in front of the projector, or None."""
    slot = _projector(model).__dict__.get(_SLOT)
    return slot[0] if slot is not None else None


# ----------------------------------------------------------------------------- the file
def save_eraser(eraser: FeatureEraser, path: str | os.PathLike, meta: Optional[dict] = None) -> None:
    """safetensors (``proj_left``, ``proj_right``, ``bias``) with JSON metadata (mode, attributes, fit counts)."""
    from ..training.checkpoint import save_tensors

    info = {"format": "fairllava-eraser/1", "hook_point": HOOK_POINT, **(meta or {})}
    save_tensors({k: v for k, v in eraser.state_dict().items()}, Path(path), info)


def load_eraser(path: str | os.PathLike) -> tuple[FeatureEraser, dict]:
    """``(eraser, metadata)`` from a file written by :func:`save_eraser`; a malformed file is a one-line error."""
    from safetensors import safe_open

    from ..training.checkpoint import load_tensors

    path = Path(path)
    sd = load_tensors(path)
    need = {"proj_left", "proj_right", "bias"}
    if set(sd) != need:
        raise FairllavaError(f"{path}: not an eraser file (tensors {sorted(sd)}, expected {sorted(need)})")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {k: json.loads(v) for k, v in raw.items()}
    if meta.get("hook_point", HOOK_POINT) != HOOK_POINT:
        raise FairllavaError(f"{path}: eraser for hook point {meta['hook_point']!r}; this version applies {HOOK_POINT!r}")
    return FeatureEraser(sd["proj_left"], sd["proj_right"], sd["bias"]), meta


def attach_saved_eraser(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Attach ``folder/erasure.safetensors`` when the folder has one (adapter or merged model); True if attached."""
    path = Path(folder) / ERASER_FILE
    if not path.is_file():
        return False
    eraser, _ = load_eraser(path)
    attach_eraser(model, eraser)
    return True


__all__ = [
    "ERASER_FILE", "FeatureEraser", "attach_eraser", "attach_saved_eraser", "attached_eraser", "detach_eraser",
    "load_eraser", "save_eraser",
]
