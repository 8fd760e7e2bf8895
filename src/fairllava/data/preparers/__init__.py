"""Preparers: raw dataset files -> validated ``{train,val,test}.jsonl`` + ``datacard.json`` (EVALUATION.md §2).

Each preparer is a library function taking a config dataclass and an output folder; the CLI
(``fairllava prepare NAME``) is a thin layer over them. ``shortcut`` (the rendered benchmark) lives
in :mod:`.shortcut` and registers its own subcommand.
"""
from .common import DataCard, grouped_split, hash_split, iter_json_records
from .ham10000 import HamConfig, prepare_ham10000
from .iu_xray import IUConfig, locate_iu_data, prepare_iu_xray
from .mimic_cxr import MimicConfig, prepare_mimic_cxr
from .padchest import PadChestConfig, prepare_padchest

__all__ = [
    "DataCard", "grouped_split", "hash_split", "iter_json_records",
    "HamConfig", "prepare_ham10000", "IUConfig", "locate_iu_data", "prepare_iu_xray",
    "MimicConfig", "prepare_mimic_cxr", "PadChestConfig", "prepare_padchest",
]
