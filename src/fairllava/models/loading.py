"""Load any HF vision-language model through the Auto classes, find its image token, add LoRA, merge.

Why one module: training, generation, audit and the CLI must all see a model the same way — the
``(model, processor)`` pair from the Auto classes — so that LLaVA-1.5, LLaVA-NeXT, Qwen2-VL-style
models and our embedded offline model (registered with the Auto classes) take the same code path.

LoRA placement follows the paper (METHOD.md §9.2): every ``nn.Linear`` of the *language model*
except ``lm_head``; never the vision tower or the projector. The projector is trained in full via
PEFT ``modules_to_save``, so ``PeftModel.from_pretrained(base, adapter_dir)`` restores it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FairllavaError


# Where the multimodal projector lives, by model family (first match wins).
_PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "visual.merger", "merger", "connector")
# Where the vision encoder lives (used only to assert it stays frozen / untouched by LoRA).
_VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")


@contextlib.contextmanager
def _peft_wrapping():
    """Silence one known third-party deprecation while PEFT wraps a model.

    PEFT's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated in
    favour of ``is_activation_checkpointing`` (same value); the warning is PEFT's, not the user's, so it is
    filtered here, narrowly (this message only, only around the wrap).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _register_custom_models() -> None:
    """Import modules whose classes register themselves with the Auto classes (our embedded VLM)."""
    from . import embedded  # noqa: F401


def _resolve_dtype(dtype: str | torch.dtype | None, device_map: str | dict | None = None) -> Any:
    """The weights dtype: ``auto`` is the compute precision of the device (models/precision.py), not the checkpoint's;
    ``checkpoint`` keeps the dtype the weights are stored in (HF's own "auto")."""
    from .precision import resolve_dtype

    if dtype == "checkpoint":
        return "auto"

    device = "cuda" if device_map not in (None, "cpu") and torch.cuda.is_available() else "cpu"  # where it is loaded
    return resolve_dtype(dtype, device)


def load_vlm(
    path_or_id: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    adapter: str | os.PathLike | None = None,
):
    """Return ``(model, processor)`` for a local folder or hub id, optionally with a PEFT adapter on top.

    ``dtype``: ``auto`` (bf16 where the device has bf16 matmul, else fp32), ``float32``, ``bfloat16`` or
    ``float16``. With an adapter, the whole model (adapter and projector included) is cast to that dtype, so
    generation and the audit run in the training precision with no per-call casts.
    Local folders are the tested path; hub ids work when online (tests run with ``HF_HUB_OFFLINE=1``).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _register_custom_models()
    src = str(path_or_id)
    local = Path(src).expanduser()
    if local.exists():
        src = str(local)
        if not (local / "config.json").is_file():
            hint = ""
            if (local / "adapter_config.json").is_file():
                hint = " (this is a LoRA adapter folder: pass the base model and --adapter DIR)"
            raise FairllavaError(f"{local}: no config.json, not a Hugging Face model folder{hint}")
    elif src.startswith((".", "/", "~")) or os.sep in src and src.count("/") > 1:
        raise FairllavaError(f"{src}: model folder not found")
    weights_dtype = _resolve_dtype(dtype, device_map)
    kwargs: dict[str, Any] = {"dtype": weights_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(src, **kwargs)
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if isinstance(e, FairllavaError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FairllavaError(f"{src}: cannot load a vision-language model and processor ({msg})") from None
    contiguous_head_input(model)
    if adapter is not None:
        from .precision import prepare_for_inference

        model = load_adapter(model, adapter)
        if isinstance(weights_dtype, torch.dtype):
            model = prepare_for_inference(model, weights_dtype)
    elif local.exists():
        from ..erasure.layer import attach_saved_eraser

        attach_saved_eraser(model, local)  # a merged `erasure` run carries its eraser in the model folder
    model.eval()
    return model, processor


def _contiguous_first_arg(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def contiguous_head_input(model) -> bool:
    """Make the LM head's input contiguous (a forward pre-hook); returns whether a head was found.

    Why: causal LMs compute the logits of the last position as ``lm_head(hidden[:, -1:, :])``, a strided slice, and
    on a CPU a bf16 ``F.linear`` on it takes a batched path that copies the whole ``[hidden, vocab]`` weight once
    per batch row (measured: 8.2 s instead of 0.04 s for 16 rows and a 49k vocabulary). The copy of the slice
    costs one row of activations; values are unchanged.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return False
    if not getattr(head, "_fairllava_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_first_arg)
        head._fairllava_contiguous_input = True
    return True


def load_adapter(model, adapter_dir: str | os.PathLike, is_trainable: bool = False):
    """Wrap ``model`` with a saved PEFT adapter (LoRA + projector via ``modules_to_save``)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FairllavaError(f"{adapter_dir}: no adapter_config.json, not a PEFT adapter folder")
    from ..erasure.layer import attach_saved_eraser

    with _peft_wrapping():
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    attach_saved_eraser(model, adapter_dir)  # method `erasure`: the fixed layer in front of the projector
    return model


def unwrap_model(model):
    """The underlying transformers model of a PEFT / accelerate-wrapped model."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module  # DDP / FSDP wrapper
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            break
    return model


def image_token_id(model) -> int:
    """The id of the token whose positions receive projected image features (``input_ids == id`` is the mask)."""
    base = unwrap_model(model)
    cfg = getattr(base, "config", None)
    for key in ("image_token_id", "image_token_index"):
        for c in (cfg, getattr(cfg, "text_config", None)):
            val = getattr(c, key, None) if c is not None else None
            if isinstance(val, int) and val >= 0:
                return val
    name = type(base).__name__
    raise FairllavaError(
        f"model {name}: cannot derive the image-token mask (its config has no image_token_id/image_token_index); "
        "fairllava supports models that splice image features at an image placeholder token (LLaVA, LLaVA-NeXT, "
        "Qwen2-VL-style)"
    )


def language_model_prefix(model) -> str:
    """Module path of the language model's decoder (e.g. ``model.language_model``)."""
    base = unwrap_model(model)
    dec = base.get_decoder() if hasattr(base, "get_decoder") else None
    if dec is None or dec is base:
        raise FairllavaError(f"model {type(base).__name__}: cannot locate its language model (no get_decoder())")
    for name, mod in base.named_modules():
        if mod is dec:
            return name
    raise FairllavaError(f"model {type(base).__name__}: get_decoder() is not a submodule of the model")


def projector_module_name(model) -> str | None:
    """Module path of the multimodal projector (None when the family has no separate projector)."""
    base = unwrap_model(model)
    names = [n for n, _ in base.named_modules()]
    for cand in _PROJECTOR_NAMES:
        for n in names:
            if n == cand or n.endswith("." + cand):
                return n
    return None


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (paper: r=64, alpha=128, dropout=0.05, every LM Linear except lm_head).

    ``shared_dropout``: LoRA layers reading the same input tensor (q/k/v, gate/up) share one dropout mask,
    drawn cheaply (models/lora_dropout.py); False keeps PEFT's independent per-layer masks.
    ``fused_forward``: the LoRA branches run as fewer, larger kernels (models/lora_fused.py); same values.
    ``fp32_sum``: under bf16/fp16 autocast, which LoRA layers add their update to the base output in fp32 and
    return fp32 (``none`` / ``residual`` / ``all``; models/lora_fused.py); ``auto`` = ``all`` with ``fused_forward``, else
    ``none``. ``residual`` and ``all`` need ``fused_forward``.
    """

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target: str = "all-linear-lm"
    train_projector: bool = True
    shared_dropout: bool = True
    fused_forward: bool = True
    fp32_sum: str = "auto"

    def __post_init__(self) -> None:
        from .lora_fused import FP32_SUM_CHOICES

        if self.fp32_sum not in FP32_SUM_CHOICES:
            raise ValueError(f"LoraSettings.fp32_sum={self.fp32_sum!r}: expected one of {', '.join(FP32_SUM_CHOICES)}")
        if self.fp32_sum in ("residual", "all") and not self.fused_forward:
            raise ValueError(f"LoraSettings.fp32_sum={self.fp32_sum!r} needs fused_forward=True (PEFT's own forward "
                             "sums in the compute dtype); set fp32_sum='none' or fused_forward=True")
        if self.r <= 0:
            raise ValueError(f"LoraSettings.r={self.r}: must be a positive integer")
        if self.alpha <= 0:
            raise ValueError(f"LoraSettings.alpha={self.alpha}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout={self.dropout}: must be in [0, 1)")
        if self.target != "all-linear-lm" and not self.target.startswith("regex:"):
            raise ValueError(
                f"LoraSettings.target={self.target!r}: expected 'all-linear-lm' or 'regex:<full-name pattern>'"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def lora_target_regex(model) -> str:
    """A PEFT full-match regex selecting every Linear of the language model (layer indices generalised)."""
    base = unwrap_model(model)
    prefix = language_model_prefix(base)
    pats: list[str] = []
    for name, mod in base.named_modules():
        if not isinstance(mod, nn.Linear) or not name.startswith(prefix + "."):
            continue
        rel = name[len(prefix) + 1 :]
        pat = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in rel.split("."))
        if pat not in pats:
            pats.append(pat)
    if not pats:
        raise FairllavaError(f"model {type(base).__name__}: its language model has no nn.Linear layers for LoRA")
    return rf"^{re.escape(prefix)}\.(?:{'|'.join(pats)})$"


def apply_lora(model, settings: LoraSettings | None = None):
    """Wrap ``model`` in a ``PeftModel``: LoRA on the LM's Linears, projector trainable, everything else frozen."""
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    target = lora_target_regex(model) if settings.target == "all-linear-lm" else settings.target[len("regex:") :]
    proj = projector_module_name(model) if settings.train_projector else None
    if settings.train_projector and proj is None:
        raise FairllavaError(f"model {type(unwrap_model(model)).__name__}: no multimodal projector found to train")
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        target_modules=target,
        modules_to_save=[proj] if proj else None,
        task_type=None,
    )
    with _peft_wrapping():
        peft_model = get_peft_model(model, cfg)
    if settings.shared_dropout:
        from .lora_dropout import share_lora_dropout

        share_lora_dropout(peft_model)
    if settings.fused_forward:
        from .lora_fused import fuse_lora

        fuse_lora(peft_model, settings.fp32_sum)  # after the dropout is shared: siblings are grouped only where their mask is one
    _check_frozen(peft_model)
    return peft_model


def _check_frozen(peft_model) -> None:
    """Guard the paper's contract: the vision tower never trains, lm_head/embeddings never train."""
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if any(v in parts for v in _VISION_NAMES) and "lora_" not in name and "modules_to_save" not in name:
            raise RuntimeError(f"vision parameter {name} is trainable after apply_lora")
        if ("lm_head" in parts or "embed_tokens" in parts) and "modules_to_save" not in name:
            raise RuntimeError(f"parameter {name} is trainable after apply_lora")


def trainable_parameter_names(model) -> list[str]:
    """Names of parameters with ``requires_grad`` (what the optimizer will update)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_adapter(
    base_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "checkpoint",
    overwrite: bool = False,
) -> Path:
    """Write base + adapter merged into a plain model folder (atomic: complete or absent)."""
    from ..io import atomic_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FairllavaError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    model, processor = load_vlm(base_path, dtype=dtype, adapter=adapter_dir)
    merged = model.merge_and_unload()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if (Path(adapter_dir) / "erasure.safetensors").is_file():  # method `erasure`: keep the eraser with the model
            shutil.copy2(Path(adapter_dir) / "erasure.safetensors", tmp / "erasure.safetensors")
        with open(tmp / "fairllava_merge.json", "w", encoding="utf-8") as f:
            json.dump({"base": str(base_path), "adapter": str(adapter_dir)}, f, indent=2)
    return out_dir


__all__ = [
    "LoraSettings",
    "apply_lora",
    "image_token_id",
    "language_model_prefix",
    "load_adapter",
    "load_vlm",
    "lora_target_regex",
    "merge_adapter",
    "projector_module_name",
    "trainable_parameter_names",
    "unwrap_model",
]
