"""Model layer: loading HF vision-language models, LoRA, the tiny test model, the offline embedded model.

Submodules are imported lazily so ``import fairllava.models`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_tiny_llava": "tiny",
    "save_tiny_llava": "tiny",
    "load_vlm": "loading",
    "image_token_id": "loading",
    "LoraSettings": "loading",
    "apply_lora": "loading",
    "trainable_parameter_names": "loading",
    "merge_adapter": "loading",
    "build_embedded_vlm": "embedded",
    "save_embedded_vlm": "embedded",
    "convert_llava_checkpoint": "convert",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
