"""The FairLLaVA method: CLUB mutual-information penalty between pooled hidden states and protected attributes."""
from .club import club_mi
from .config import RECOMMENDED_ESTIMATOR, AttributeSpec, FairnessConfig
from .distributed import all_gather_labels, all_gather_with_grad
from .heads import build_head, dac_loss
from .health import DeadDACError, DeadDACWarning
from .pooling import pool, select_tokens
from .regularizer import FairnessRegularizer

__all__ = [
    "RECOMMENDED_ESTIMATOR",
    "AttributeSpec",
    "DeadDACError",
    "DeadDACWarning",
    "FairnessConfig",
    "FairnessRegularizer",
    "all_gather_labels",
    "all_gather_with_grad",
    "build_head",
    "club_mi",
    "dac_loss",
    "pool",
    "select_tokens",
]
