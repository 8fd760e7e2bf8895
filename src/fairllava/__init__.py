"""fairllava — FairLLaVA fair fine-tuning and fairness auditing for vision-language models."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["FairnessConfig", "FairnessRegularizer", "__version__", "club_mi"]

if TYPE_CHECKING:  # pragma: no cover
    from .regularizer import FairnessConfig, FairnessRegularizer, club_mi


def __getattr__(name: str) -> Any:
    # Lazy: `import fairllava` (and the CLI's --help) must not pay for importing torch.
    if name in ("club_mi", "FairnessConfig", "FairnessRegularizer"):
        from . import regularizer

        return getattr(regularizer, name)
    raise AttributeError(f"module 'fairllava' has no attribute {name!r}")
