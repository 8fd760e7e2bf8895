"""Demographic-aware vision-language data: records, vocabularies, validation, dataset, collator,
samplers and preparers (issue 4; EVALUATION.md §1-2)."""
from .attributes import (
    AGE_GROUP,
    HAM_AGE_BINS,
    IGNORE_INDEX,
    MIMIC_AGE_BINS,
    RACE5,
    RACE8,
    SEX,
    AgeBins,
    AttributeVocab,
    MatchRule,
    age_to_group,
    apply_missing_policy,
    default_vocabs,
    vocabs_from_config,
)
from .collator import VLMCollator
from .dataset import VLMDataset
from .schema import check_record, record_problems

__all__ = [
    "AGE_GROUP", "HAM_AGE_BINS", "IGNORE_INDEX", "MIMIC_AGE_BINS", "RACE5", "RACE8", "SEX", "AgeBins",
    "AttributeVocab", "MatchRule", "age_to_group", "apply_missing_policy", "default_vocabs", "vocabs_from_config",
    "VLMCollator", "VLMDataset", "check_record", "record_problems",
]
