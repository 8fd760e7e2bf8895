"""``FairnessConfig``: every knob of the MI regulariser, validated strictly.

Why strict: the reference silently ignored misspelt keys and duplicated an attribute (METHOD.md §12 #4), so a
run could train something other than what its config said. Unknown keys, duplicates with conflicting values,
and out-of-range values are errors here. Defaults reproduce the reference (METHOD.md §9.4 ``mimic_cxr`` preset).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import FairllavaError

TOKEN_MODES = ("image", "text", "all")
POOLINGS = ("random_token", "masked_mean", "token")
DAC_LOSSES = ("ce", "focal", "balanced", "logit_adjusted")
PENALTIES = ("smooth_abs", "signed", "relu")
NEGATIVES = ("offdiag", "full", "other_samples")
UPDATE_MODES = ("joint", "alternating")
ALTERNATING_PENALTY_HEADS = ("same_batch", "held_out")
ON_DEAD_DAC = ("warn", "error", "ignore")
STRATA_SOURCES = ("label", "chexpert_rules")
# [ours] Estimator settings under which the DAC learns on LM states with outlier dimensions (docs/training.md,
# "Recommended estimator"; tests/test_regularizer_health.py, bench/dac_health.py): per-dimension standardisation
# instead of L2, a DAC lr of 1e-2 (not the LoRA lr), every selected token as a sample with the same sample's
# other tokens kept out of the negatives, no weight for strata with a single attribute class, (alternating
# mode) a penalty scored by heads not fitted on the batch, and the penalty off for the first 50 steps while the
# DAC learns (as long as the dead-DAC check's warm-up): with the penalty from step 1 the DAC on the demo model's
# mid-layer states was chased to chance (0.501) and the run levelled down; with this warm-up it reached 0.79
# (docs/benchmark.md). Layer, lambda, conditioning and the gradient budget are left to the run.
RECOMMENDED_ESTIMATOR: dict[str, Any] = {
    "mi_standardize": True,
    "mi_l2_normalize": False,
    "dac_lr": 1e-2,
    "mi_pooling": "token",
    "negatives": "other_samples",
    "mi_skip_single_group_strata": True,
    "alternating_penalty_heads": "held_out",  # used only with update_mode: alternating
    "dac_warmup_steps": 50,  # = the default dac_health_warmup_steps: the check reads a DAC nothing has chased yet
}
QUEUE_MAX_BYTES = 1 << 30  # the label queue is tiny per row; a bound this large only catches a typo'd size


@dataclass(frozen=True)
class AttributeSpec:
    """One protected attribute: its number of classes K_a and its DIM weight lambda_a."""

    num_classes: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise FairllavaError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) \
                or self.weight < 0:
            raise FairllavaError(f"weight must be a finite number >= 0, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "weight": self.weight}


def _default_attributes() -> dict[str, AttributeSpec]:
    # mimic_cxr preset; names follow the record schema (docs/DESIGN.md "Records").
    return {
        "race": AttributeSpec(8, 0.2),
        "age_group": AttributeSpec(3, 0.6),
        "sex": AttributeSpec(2, 0.1),
    }


def _spec(name: str, value: Any) -> AttributeSpec:
    if isinstance(value, AttributeSpec):
        return value
    if isinstance(value, bool):
        raise FairllavaError(f"attributes.{name}: expected {{num_classes, weight}}, got {value!r}")
    if isinstance(value, int):
        value = {"num_classes": value}
    if not isinstance(value, Mapping):
        raise FairllavaError(f"attributes.{name}: expected a mapping {{num_classes, weight}}, got {value!r}")
    unknown = set(value) - {"num_classes", "weight"}
    if unknown:
        raise FairllavaError(
            f"attributes.{name}: unknown key(s) {sorted(unknown)}; valid keys: ['num_classes', 'weight']"
        )
    if "num_classes" not in value:
        raise FairllavaError(f"attributes.{name}: 'num_classes' is required")
    try:
        return AttributeSpec(value["num_classes"], value.get("weight", 1.0))
    except FairllavaError as e:
        raise FairllavaError(f"attributes.{name}: {e}") from None


def normalize_attributes(value: Any) -> dict[str, AttributeSpec]:
    """Accept ``{name: {num_classes, weight}}`` or a list of ``{name, num_classes, weight}``; deduplicate."""
    items: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise FairllavaError(f"attributes[{i}]: expected a mapping with a 'name' key, got {entry!r}")
            entry = dict(entry)
            items.append((entry.pop("name"), entry))
    else:
        raise FairllavaError(f"attributes: expected a mapping or a list, got {type(value).__name__}")
    out: dict[str, AttributeSpec] = {}
    for name, spec in items:
        if not isinstance(name, str) or not name:
            raise FairllavaError(f"attributes: attribute names must be non-empty strings, got {name!r}")
        parsed = _spec(name, spec)
        if name in out and out[name] != parsed:
            raise FairllavaError(
                f"attributes: {name!r} is listed twice with different settings ({out[name]} vs {parsed})"
            )
        out[name] = parsed
    if not out:
        raise FairllavaError("attributes: at least one attribute is required")
    return out


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise FairllavaError(f"{name} must be one of {list(options)}, got {value!r}")


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None, integer: bool = False) -> None:
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise FairllavaError(f"{name} must be {kind}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise FairllavaError(f"{name} must be in {rng}, got {value!r}")


@dataclass
class FairnessConfig:
    """Settings of ``FairnessRegularizer`` (see METHOD.md §3–8 for each term)."""

    attributes: dict[str, AttributeSpec] = field(default_factory=_default_attributes)
    fairness_lambda: float = 1.0        # lambda_fair: scales DIM *and* the DAC CE (reference quirk, kept)
    dac_loss_weight: float = 1.0        # w_dac
    ce_loss_weight: float = 1.0         # w_ce: the trainer multiplies the LM loss by it
    mi_layer_frac: float = 0.5          # idx = int(n_hs * frac) if frac < 1 else the last entry
    mi_layer_index: int | list[int] | None = None  # overrides the fraction; a list = position-wise mean
    mi_token_mode: str = "image"        # image | text (attention ∧ ¬image; includes teacher-forced answer) | all
    mi_drop_bos_eos: bool = False       # drop first/last valid position (ignored in image mode)
    mi_pooling: str = "random_token"    # random_token | masked_mean | token (every selected token is a sample)
    mi_max_tokens_per_sample: int | None = None  # cap for token pooling (random subsample, seeded)
    mi_l2_normalize: bool | None = None  # None = auto: True for random_token, False otherwise
    mi_standardize: bool = False        # [ours] per-dimension running standardisation of z before the heads
    mi_standardize_momentum: float = 0.05  # EMA weight of each new batch's moments (the first batches average)
    dac_hidden_size: int | None = None  # None = Linear(D, K) (reference); int = Linear-ReLU-Linear MLP
    dac_lr: float | None = None         # None = the trainer's lr (reference); measured: a higher lr helps
    dac_loss: str = "ce"                # ce | focal | balanced | logit_adjusted
    dac_focal_gamma: float = 2.0
    dac_balanced_beta: float = 0.999994
    dac_logit_adjust_tau: float = 0.5
    dac_class_counts: dict[str, list[int]] | None = None  # training-set class counts (balanced/logit_adjusted)
    mi_penalty: str = "smooth_abs"      # smooth_abs sqrt(I^2 + eps) (reference) | signed (paper Eq. 9) | relu
    mi_penalty_eps: float = 1e-6
    negatives: str = "offdiag"          # offdiag (reference) | full (original CLUB) | other_samples (token pooling:
    #                                     no pair of rows from the same sample among the negatives)
    mi_conditional: bool = False        # [ours] estimate I(a; z | task label): negatives only within the same label
    mi_strata_source: str = "label"     # [ours] label = the records' `label`; chexpert_rules = findings derived from
    #                                     the target report by fairllava.metrics.chexpert_rules (report generation)
    mi_strata_findings: list[str] = field(default_factory=lambda: ["No Finding"])  # chexpert_rules: findings whose
    #                                     binarised values (uncertain -> negative) define the strata
    mi_skip_single_group_strata: bool = False  # [ours] a stratum whose rows share one attribute class gets weight 0
    queue_size: int = 0                 # [ours] FIFO of past rows' labels (and strata) added as CLUB negatives; 0 = off
    update_mode: str = "joint"          # joint (reference, stop-gradients) | alternating (paper Algorithm 1)
    n_dac_steps: int = 1                # DAC updates per micro-batch in alternating mode
    alternating_penalty_heads: str = "same_batch"  # same_batch (today: heads just fitted on this batch) | held_out
    #                                     (heads as they were before this batch's DAC update: fitted on other data)
    penalty_grad_clip: float | None = None   # [ours] max norm of the penalty's own gradient; null = joint clipping
    penalty_grad_ratio: float | None = None  # [ours] penalty grad norm <= ratio x (clipped) LM grad norm; null = off
    dac_health_window: int = 256        # [ours] rolling window (samples) of prequential DAC predictions
    dac_health_warmup_steps: int = 50   # [ours] optimizer step at which a DAC still at chance is reported
    dac_health_margin: float = 0.05     # [ours] "at chance" = held-out balanced accuracy < 1/K + margin
    on_dead_dac: str = "warn"           # [ours] warn | error (FairllavaError, no complete checkpoint left) | ignore
    dac_warmup_steps: int = 0           # penalty weight is 0 before this step; the DAC still trains
    gather_across_ranks: bool = False   # all-gather z and labels so negatives come from the global batch
    seed: int = 42                      # seeds the token-sampling generator
    ignore_index: int = -100

    def __post_init__(self) -> None:
        self.attributes = normalize_attributes(self.attributes)
        for key in ("fairness_lambda", "dac_loss_weight", "ce_loss_weight"):
            _number(key, getattr(self, key), lo=0.0)
            setattr(self, key, float(getattr(self, key)))
        _number("mi_layer_frac", self.mi_layer_frac, 0.0, 1.0)
        idx = self.mi_layer_index
        if idx is not None:
            if isinstance(idx, tuple):
                idx = self.mi_layer_index = list(idx)
            items = idx if isinstance(idx, list) else [idx]
            if not items:
                raise FairllavaError("mi_layer_index: an empty list selects no layer")
            for i in items:
                _number("mi_layer_index", i, integer=True)
            if isinstance(idx, list) and len(set(idx)) != len(idx):
                raise FairllavaError(f"mi_layer_index: duplicate layer indices in {idx}")
        _choice("mi_token_mode", self.mi_token_mode, TOKEN_MODES)
        _choice("mi_pooling", self.mi_pooling, POOLINGS)
        _choice("dac_loss", self.dac_loss, DAC_LOSSES)
        _choice("mi_penalty", self.mi_penalty, PENALTIES)
        _choice("negatives", self.negatives, NEGATIVES)
        _choice("update_mode", self.update_mode, UPDATE_MODES)
        _choice("alternating_penalty_heads", self.alternating_penalty_heads, ALTERNATING_PENALTY_HEADS)
        _choice("on_dead_dac", self.on_dead_dac, ON_DEAD_DAC)
        _choice("mi_strata_source", self.mi_strata_source, STRATA_SOURCES)
        self._check_new_knobs()
        for key in ("mi_drop_bos_eos", "gather_across_ranks", "mi_skip_single_group_strata"):
            if not isinstance(getattr(self, key), bool):
                raise FairllavaError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.mi_l2_normalize is not None and not isinstance(self.mi_l2_normalize, bool):
            raise FairllavaError(f"mi_l2_normalize must be true, false or null, got {self.mi_l2_normalize!r}")
        if self.mi_max_tokens_per_sample is not None:
            _number("mi_max_tokens_per_sample", self.mi_max_tokens_per_sample, lo=1, integer=True)
        if self.dac_hidden_size is not None:
            _number("dac_hidden_size", self.dac_hidden_size, lo=1, integer=True)
        if self.dac_lr is not None:
            _number("dac_lr", self.dac_lr, lo=0.0)
            if self.dac_lr <= 0:
                raise FairllavaError(f"dac_lr must be > 0 (or null to use the trainer lr), got {self.dac_lr!r}")
            self.dac_lr = float(self.dac_lr)
        if not isinstance(self.mi_standardize, bool):
            raise FairllavaError(f"mi_standardize must be true or false, got {self.mi_standardize!r}")
        _number("mi_standardize_momentum", self.mi_standardize_momentum, lo=0.0, hi=1.0)
        if self.mi_standardize_momentum <= 0:
            raise FairllavaError(f"mi_standardize_momentum must be in (0, 1], got {self.mi_standardize_momentum!r}")
        _number("dac_focal_gamma", self.dac_focal_gamma, lo=0.0)
        _number("dac_balanced_beta", self.dac_balanced_beta, lo=0.0)
        if not self.dac_balanced_beta < 1.0:
            raise FairllavaError(f"dac_balanced_beta must be in [0, 1), got {self.dac_balanced_beta!r}")
        _number("dac_logit_adjust_tau", self.dac_logit_adjust_tau)
        _number("mi_penalty_eps", self.mi_penalty_eps, lo=0.0)
        _number("n_dac_steps", self.n_dac_steps, lo=1, integer=True)
        _number("dac_warmup_steps", self.dac_warmup_steps, lo=0, integer=True)
        _number("seed", self.seed, integer=True)
        _number("ignore_index", self.ignore_index, integer=True)
        if 0 <= self.ignore_index:
            raise FairllavaError(f"ignore_index must be negative (it must never collide with a class id), "
                                 f"got {self.ignore_index}")
        if self.dac_class_counts is not None:
            self.dac_class_counts = {k: list(v) for k, v in dict(self.dac_class_counts).items()}
            for name, counts in self.dac_class_counts.items():
                check_class_counts(name, counts, self.attributes)

    def _check_new_knobs(self) -> None:
        if isinstance(self.mi_strata_findings, tuple):
            self.mi_strata_findings = list(self.mi_strata_findings)
        f = self.mi_strata_findings
        if not isinstance(f, list) or not f or not all(isinstance(x, str) for x in f) or len(set(f)) != len(f):
            raise FairllavaError(f"mi_strata_findings must be a non-empty list of distinct CheXpert finding names, "
                                 f"got {f!r}")
        if self.mi_strata_source == "chexpert_rules":
            from ..metrics.chexpert_rules import CONDITIONS  # only then: fairllava.metrics is a heavier import

            bad = [x for x in f if x not in CONDITIONS]
            if bad:
                raise FairllavaError(f"mi_strata_findings: {bad} are not CheXpert findings; valid: {CONDITIONS}")
        _number("queue_size", self.queue_size, lo=0, integer=True)
        need = self.queue_size * (len(self.attributes) + 1) * 8
        if need > QUEUE_MAX_BYTES:
            raise FairllavaError(f"queue_size={self.queue_size} would need {need / 2**20:,.0f} MiB for the label queue "
                                 f"(bound {QUEUE_MAX_BYTES >> 20} MiB); use at most "
                                 f"{QUEUE_MAX_BYTES // ((len(self.attributes) + 1) * 8):,} rows")
        for key in ("penalty_grad_clip", "penalty_grad_ratio"):
            v = getattr(self, key)
            if v is not None:
                _number(key, v, lo=0.0)
                if v <= 0:
                    raise FairllavaError(f"{key} must be > 0 (or null for joint clipping), got {v!r}")
                setattr(self, key, float(v))
        _number("dac_health_window", self.dac_health_window, lo=1, integer=True)
        _number("dac_health_warmup_steps", self.dac_health_warmup_steps, lo=0, integer=True)
        _number("dac_health_margin", self.dac_health_margin, lo=0.0, hi=1.0)

    # ------------------------------------------------------------------ helpers
    @property
    def separate_penalty_budget(self) -> bool:
        """Whether the penalty's gradient is clipped on its own (two-pass), not jointly with the LM loss."""
        return self.penalty_grad_clip is not None or self.penalty_grad_ratio is not None

    @property
    def attribute_names(self) -> list[str]:
        return list(self.attributes)

    @property
    def l2_normalize(self) -> bool:
        """Resolved ``mi_l2_normalize`` (auto: only for ``random_token``, as in the reference)."""
        if self.mi_l2_normalize is None:
            return self.mi_pooling == "random_token"
        return self.mi_l2_normalize

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FairnessConfig":
        if not isinstance(data, Mapping):
            raise FairllavaError(f"fairness config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.valid_keys()))
        if unknown:
            raise FairllavaError(f"fairness config: unknown key(s) {unknown}; valid keys: {cls.valid_keys()}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "attributes":
                v = {k: s.to_dict() for k, s in v.items()}
            elif isinstance(v, list):
                v = list(v)
            elif isinstance(v, dict):
                v = {k: list(c) for k, c in v.items()}
            out[f.name] = v
        return out


def check_class_counts(name: str, counts: Any, attributes: Mapping[str, AttributeSpec]) -> list[int]:
    """Validate training-set class counts for attribute ``name`` (used by balanced / logit-adjusted DAC losses)."""
    if name not in attributes:
        raise FairllavaError(f"dac_class_counts: unknown attribute {name!r}; configured: {list(attributes)}")
    k = attributes[name].num_classes
    if not isinstance(counts, (list, tuple)) or len(counts) != k:
        raise FairllavaError(f"dac_class_counts.{name}: expected a list of {k} counts, got {counts!r}")
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0 or not math.isfinite(c):
            raise FairllavaError(f"dac_class_counts.{name}: counts must be finite numbers >= 0, got {counts!r}")
    if sum(counts) <= 0:
        raise FairllavaError(f"dac_class_counts.{name}: all counts are zero")
    return [c for c in counts]
