"""Training (issue 3): strict run configs and presets, the methods (FairLLaVA and baselines), the trainer."""
from .config import TrainConfig, list_presets, load_config, preset, save_config
from .methods import (
    DACMLP, AdversarialMethod, FairLLaVAMethod, GradientReversal, LinearRampSchedule, LoraMethod, Method,
    ResampleMethod, ReweightMethod, grad_reverse, per_sample_lm_loss, token_mean_lm_loss,
)


def train(config, resume: bool = False):
    """Train one run (see :class:`fairllava.training.trainer.FairTrainer`); returns the run directory."""
    from .trainer import train as _train

    return _train(config, resume=resume)


__all__ = [
    "TrainConfig", "list_presets", "load_config", "preset", "save_config", "train",
    "DACMLP", "AdversarialMethod", "FairLLaVAMethod", "GradientReversal", "LinearRampSchedule", "LoraMethod",
    "Method", "ResampleMethod", "ReweightMethod", "grad_reverse", "per_sample_lm_loss", "token_mean_lm_loss",
]
