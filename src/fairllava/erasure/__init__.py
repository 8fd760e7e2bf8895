"""Method ``erasure`` (issue 13): class-conditional LEACE of the attributes from the projector's input.

``layer``: the fitted map as a fixed layer (forward pre-hook on the projector) and its file beside the adapter;
``fit``: the statistics, the fitting pass over the training split and the training method. Imported lazily.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ERASER_FILE": "layer", "FeatureEraser": "layer", "attach_eraser": "layer", "attach_saved_eraser": "layer",
    "attached_eraser": "layer", "detach_eraser": "layer", "load_eraser": "layer", "save_eraser": "layer",
    "ErasureMethod": "fit", "ErasureStats": "fit", "FitLabels": "fit", "build_erasure_method": "fit",
    "fit_eraser": "fit", "fit_labels": "fit", "projector_inputs": "fit",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
