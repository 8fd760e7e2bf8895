"""Compatibility shim: the shortcut benchmark's renderers moved to :mod:`fairllava.benchmark`.

``fairllava prepare shortcut`` and existing imports keep working; new code imports from
``fairllava.benchmark`` (``prepare``, ``derm``, ``cxr``, ``rendering``, ``evidence``).
"""
from __future__ import annotations

from ...benchmark.cxr import (CXR_FINDING_KEYWORDS, CXR_GAIN, CXR_LABELS, CXR_QUESTION, CxrSource,  # noqa: F401
                              cxr_findings, read_iu_reports, render_cxr)
from ...benchmark.derm import (DERM_AMBIGUITY, DERM_ANSWERS, DERM_IRREGULARITY, DERM_LABELS,  # noqa: F401
                               DERM_LOG_RATIO, DERM_QUESTIONS, SKIN_TONES, DermAmbiguity, render_derm)
from ...benchmark.evidence import image_features, within_group_probe  # noqa: F401
from ...benchmark.prepare import prepare_shortcut  # noqa: F401
from ...benchmark.rendering import (AGE_GROUP_CLASSES, GENERATOR_VERSION, MAJORITY_TONE,  # noqa: F401
                                    MAX_SHORTCUT_SHARE, MINORITY_TONE, RACE_CLASSES, SEX_CLASSES, SPLITS, TASKS,
                                    VOCAB_CONFIG, ShortcutConfig, shortcut_class_probs, shortcut_vocabs)
