"""fairllava — FairLLaVA fair fine-tuning and fairness auditing for vision-language models."""
__version__ = "0.1.0"
