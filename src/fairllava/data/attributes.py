"""Attribute vocabularies: demographic value strings <-> class ids, with an explicit "missing".

Why: the reference mapped unknown genders to an out-of-range class and unmatched race strings
silently to class 7 (METHOD.md §12 #1). Here every vocabulary is explicit: a missing value
(``None``/``""``/NaN) encodes to :data:`IGNORE_INDEX` and is excluded from the MI/DAC terms, and a
string that matches no class raises unless the vocabulary is configured ``unknown="ignore"``
(then it is counted). Raw-source strings (e.g. MIMIC-IV race) are mapped by ordered, case-insensitive
rules that are themselves configuration.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

from ..errors import FairllavaError

IGNORE_INDEX = -100

MISSING_POLICIES = ("drop", "ignore", "error")


def is_missing(value: Any) -> bool:
    """None, empty/whitespace strings and float NaN are "missing" (never a class)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return False


@dataclass(frozen=True)
class MatchRule:
    """One raw-string rule: ``kind`` is ``exact``, ``prefix`` or ``contains`` (case-insensitive)."""

    kind: Literal["exact", "prefix", "contains"]
    pattern: str
    target: str

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "prefix", "contains"):
            raise ValueError(f"MatchRule.kind: expected exact|prefix|contains, got {self.kind!r}")

    def matches(self, folded: str) -> bool:
        p = self.pattern.strip().casefold()
        if self.kind == "exact":
            return folded == p
        if self.kind == "prefix":
            return folded.startswith(p)
        return p in folded


class AttributeVocab:
    """Maps the value strings of one attribute to class ids ``0..K-1``.

    Resolution order for a string: class name (case-insensitive) -> ``aliases`` (case-insensitive)
    -> ``rules`` (first match wins) -> ``excluded`` -> unknown. ``excluded`` values are real,
    known values that this vocabulary deliberately does not model (e.g. race classes 5-7 in the
    5-group evaluation); they encode to ``IGNORE_INDEX`` and are counted. ``counts`` records
    ``missing``/``excluded``/``ignored_unknown`` occurrences since construction (or ``reset_counts``).
    """

    def __init__(
        self,
        name: str,
        classes: Sequence[str],
        aliases: Mapping[str, str] | None = None,
        unknown: Literal["error", "ignore"] = "error",
        rules: Sequence[MatchRule] = (),
        excluded: Iterable[str] = (),
    ) -> None:
        if not name or not isinstance(name, str):
            raise ValueError("AttributeVocab.name: expected a non-empty string")
        classes = list(classes)
        if not classes:
            raise ValueError(f"AttributeVocab({name}).classes: expected at least one class")
        folded = [str(c).casefold() for c in classes]
        if len(set(folded)) != len(folded):
            raise ValueError(f"AttributeVocab({name}).classes: duplicate class names {classes}")
        if unknown not in ("error", "ignore"):
            raise ValueError(f"AttributeVocab({name}).unknown: expected 'error' or 'ignore', got {unknown!r}")
        self.name = name
        self.classes = [str(c) for c in classes]
        self.unknown = unknown
        self._index = {c.casefold(): i for i, c in enumerate(self.classes)}
        self.aliases: dict[str, str] = {}
        for k, v in (aliases or {}).items():
            if str(v).casefold() not in self._index:
                raise ValueError(f"AttributeVocab({name}).aliases[{k!r}]: {v!r} is not one of {self.classes}")
            self.aliases[str(k).strip().casefold()] = self.classes[self._index[str(v).casefold()]]
        self.excluded = {str(e).strip().casefold() for e in excluded}
        self.rules = list(rules)
        for r in self.rules:
            if r.target.casefold() not in self._index and r.target.strip().casefold() not in self.excluded:
                raise ValueError(f"AttributeVocab({name}).rules: target {r.target!r} is not a class or excluded value")
        self.counts: Counter[str] = Counter()

    # -- mapping -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, value: Any) -> str | None:
        """Raw value -> canonical class name, or ``None`` for missing / excluded / ignored unknown."""
        if is_missing(value):
            self.counts["missing"] += 1
            return None
        if isinstance(value, bool) or not isinstance(value, str):
            raise FairllavaError(
                f"attribute {self.name}: expected a string class name or null, got {type(value).__name__} {value!r}"
            )
        key = value.strip().casefold()
        if key in self._index:
            return self.classes[self._index[key]]
        if key in self.aliases:
            return self.aliases[key]
        for rule in self.rules:
            if rule.matches(key):
                if rule.target.strip().casefold() in self.excluded:
                    self.counts["excluded"] += 1
                    return None
                return self.classes[self._index[rule.target.casefold()]]
        if key in self.excluded:
            self.counts["excluded"] += 1
            return None
        if self.unknown == "ignore":
            self.counts["ignored_unknown"] += 1
            return None
        raise FairllavaError(
            f"attribute {self.name}: unknown value {value!r} (expected one of {self.classes}"
            f"{' or a configured alias' if self.aliases or self.rules else ''}; set unknown: ignore to mask it)"
        )

    def encode(self, value: Any) -> int:
        """Value -> class id; missing/excluded/ignored -> ``IGNORE_INDEX``."""
        name = self.normalize(value)
        return IGNORE_INDEX if name is None else self._index[name.casefold()]

    def decode(self, i: int) -> str | None:
        """Class id -> class name (``IGNORE_INDEX`` -> ``None``)."""
        i = int(i)
        if i == IGNORE_INDEX:
            return None
        if not 0 <= i < len(self.classes):
            raise ValueError(f"AttributeVocab({self.name}).decode: id {i} out of range 0..{len(self.classes) - 1}")
        return self.classes[i]

    def reset_counts(self) -> None:
        self.counts = Counter()

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes),
            "aliases": dict(self.aliases),
            "unknown": self.unknown,
            "rules": [{"match": r.kind, "pattern": r.pattern, "class": r.target} for r in self.rules],
            "excluded": sorted(self.excluded),
        }

    def copy(self, **changes: Any) -> "AttributeVocab":
        d = {
            "name": self.name,
            "classes": self.classes,
            "aliases": self.aliases,
            "unknown": self.unknown,
            "rules": self.rules,
            "excluded": self.excluded,
        }
        d.update(changes)
        return AttributeVocab(**d)

    def __repr__(self) -> str:
        return f"AttributeVocab({self.name!r}, {self.classes}, unknown={self.unknown!r})"


# -- sex -----------------------------------------------------------------------------------------
SEX_CLASSES = ["M", "F"]
SEX_ALIASES = {"male": "M", "female": "F", "man": "M", "woman": "F"}


def sex_vocab(name: str = "sex", unknown: Literal["error", "ignore"] = "error") -> AttributeVocab:
    """Sex: M=0, F=1 (METHOD.md §7: male 0, female 1). ``m``/``f`` match the class names case-insensitively."""
    return AttributeVocab(name, SEX_CLASSES, SEX_ALIASES, unknown=unknown)


# -- age -----------------------------------------------------------------------------------------
AGE_GROUP_CLASSES = ["0-44", "45-65", "66+"]
# The reference displays bins as 0-44 / 44-65 / 65+ (EVALUATION.md §2.1); accept those and en-dashes.
AGE_GROUP_ALIASES = {"0\u201344": "0-44", "45\u201365": "45-65", "44-65": "45-65", "44\u201365": "45-65", "65+": "66+"}


@dataclass(frozen=True)
class AgeBins:
    """Three age bins from two edges. ``right_closed=True``: ``age <= e0`` | ``<= e1`` | rest (MIMIC 44, 65);
    ``False``: ``age < e0`` | ``< e1`` | rest (HAM10000 45, 66). Integer ages give the same bins either way."""

    edges: tuple[float, float]
    right_closed: bool
    labels: tuple[str, str, str] = tuple(AGE_GROUP_CLASSES)  # type: ignore[assignment]

    def to_dict(self) -> dict:
        op = "<=" if self.right_closed else "<"
        return {
            "edges": list(self.edges),
            "right_closed": self.right_closed,
            "rule": f"{self.labels[0]}: age {op} {self.edges[0]}; {self.labels[1]}: age {op} {self.edges[1]}; "
            f"{self.labels[2]}: otherwise",
            "labels": list(self.labels),
        }


MIMIC_AGE_BINS = AgeBins((44, 65), right_closed=True)
HAM_AGE_BINS = AgeBins((45, 66), right_closed=False)


def parse_age(value: Any, *, where: str = "age") -> float | None:
    """Raw age (number or numeric string) -> float; missing -> None; anything else -> FairllavaError."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        raise FairllavaError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        age = float(value)
    else:
        try:
            age = float(str(value).strip())
        except ValueError:
            raise FairllavaError(f"{where}: expected a number, got {value!r}") from None
    if math.isnan(age):
        return None
    if not 0 <= age <= 130:
        raise FairllavaError(f"{where}: age {value!r} outside 0..130")
    return age


def age_to_group(age: Any, cutoffs: AgeBins = MIMIC_AGE_BINS, *, where: str = "age") -> str | None:
    """Age -> bin label (``"0-44"``, ``"45-65"``, ``"66+"``); missing -> None; non-numeric -> error."""
    a = parse_age(age, where=where)
    if a is None:
        return None
    e0, e1 = cutoffs.edges
    if cutoffs.right_closed:
        idx = 0 if a <= e0 else 1 if a <= e1 else 2
    else:
        idx = 0 if a < e0 else 1 if a < e1 else 2
    return cutoffs.labels[idx]


def age_group_vocab(name: str = "age_group", unknown: Literal["error", "ignore"] = "error") -> AttributeVocab:
    return AttributeVocab(name, AGE_GROUP_CLASSES, AGE_GROUP_ALIASES, unknown=unknown)


# -- race ----------------------------------------------------------------------------------------
RACE8_CLASSES = ["White", "Black", "Asian", "Hispanic", "Other", "AIAN", "NHPI", "Unknown"]
RACE8_ALIASES = {
    "Black / African American": "Black",
    "Black/African American": "Black",
    "Hispanic / Latino": "Hispanic",
    "Hispanic/Latino": "Hispanic",
    "American Indian / Alaska Native": "AIAN",
    "Native Hawaiian / Pacific Islander": "NHPI",
    "Unknown / declined": "Unknown",
}
# Raw MIMIC-IV strings (EVALUATION.md §2.1), checked in order after class names and aliases.
# Exact rules come first so "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER" never hits a looser rule.
RACE8_RULES: tuple[MatchRule, ...] = (
    MatchRule("exact", "AMERICAN INDIAN/ALASKA NATIVE", "AIAN"),
    MatchRule("prefix", "AMERICAN INDIAN", "AIAN"),
    MatchRule("exact", "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "NHPI"),
    MatchRule("prefix", "NATIVE HAWAIIAN", "NHPI"),
    MatchRule("exact", "OTHER", "Other"),
    MatchRule("exact", "MULTIPLE RACE/ETHNICITY", "Other"),
    MatchRule("exact", "PORTUGUESE", "Other"),
    MatchRule("exact", "UNKNOWN", "Unknown"),
    MatchRule("exact", "UNKNOWN/NOT SPECIFIED", "Unknown"),
    MatchRule("exact", "UNABLE TO OBTAIN", "Unknown"),
    MatchRule("exact", "PATIENT DECLINED TO ANSWER", "Unknown"),
    MatchRule("prefix", "WHITE", "White"),
    MatchRule("prefix", "BLACK", "Black"),
    MatchRule("prefix", "ASIAN", "Asian"),
    MatchRule("prefix", "HISPANIC", "Hispanic"),
    MatchRule("contains", "LATINO", "Hispanic"),
    MatchRule("exact", "SOUTH AMERICAN", "Hispanic"),
)
RACE5_CLASSES = ["White", "Black", "Asian", "Hispanic", "Other"]
RACE5_EXCLUDED = ("AIAN", "NHPI", "Unknown")


def race8_vocab(
    name: str = "race", unknown: Literal["error", "ignore"] = "error", unknown_class: Literal["train", "mask"] = "train"
) -> AttributeVocab:
    """8 training classes. ``unknown_class="mask"`` turns class 7 (Unknown/declined) into an excluded value
    (ignore index, counted) instead of a training label — the config switch of EVALUATION.md §2.1."""
    if unknown_class not in ("train", "mask"):
        raise ValueError(f"race8_vocab.unknown_class: expected 'train' or 'mask', got {unknown_class!r}")
    if unknown_class == "train":
        return AttributeVocab(name, RACE8_CLASSES, RACE8_ALIASES, unknown=unknown, rules=RACE8_RULES)
    classes = RACE8_CLASSES[:-1]
    aliases = {k: v for k, v in RACE8_ALIASES.items() if v != "Unknown"}
    return AttributeVocab(name, classes, aliases, unknown=unknown, rules=RACE8_RULES, excluded=["Unknown", "Unknown / declined"])


def race5_vocab(name: str = "race", merge_minor: bool = False, unknown: Literal["error", "ignore"] = "error") -> AttributeVocab:
    """5 evaluation groups. Classes 5-7 are excluded (ignore index, counted) unless ``merge_minor`` maps
    AIAN/NHPI into Other (Unknown is always excluded)."""
    aliases = dict(RACE8_ALIASES)
    excluded = list(RACE5_EXCLUDED) + ["Unknown / declined"]
    if merge_minor:
        aliases.update({"AIAN": "Other", "NHPI": "Other", "American Indian / Alaska Native": "Other",
                        "Native Hawaiian / Pacific Islander": "Other"})
        aliases = {k: v for k, v in aliases.items() if v in RACE5_CLASSES}
        excluded = ["Unknown", "Unknown / declined"]
        rules = tuple(MatchRule(r.kind, r.pattern, "Other" if r.target in ("AIAN", "NHPI") else r.target) for r in RACE8_RULES)
    else:
        aliases = {k: v for k, v in aliases.items() if v in RACE5_CLASSES}
        rules = RACE8_RULES
    return AttributeVocab(name, RACE5_CLASSES, aliases, unknown=unknown, rules=rules, excluded=excluded)


def map_race(raw: Any, vocab: AttributeVocab | None = None) -> str | None:
    """Raw source string (e.g. MIMIC-IV ``race``) -> RACE8 class name. Empty strings are the
    "Unknown/declined" class per EVALUATION.md §2.1 (a *recorded* empty answer); ``None`` stays missing."""
    vocab = vocab or RACE8
    if isinstance(raw, str) and not raw.strip():
        return vocab.normalize("UNKNOWN")
    return vocab.normalize(raw)


SEX = sex_vocab()
AGE_GROUP = age_group_vocab()
RACE8 = race8_vocab()
RACE5 = race5_vocab()

PRESETS = {
    "sex": sex_vocab,
    "age_group": age_group_vocab,
    "race8": race8_vocab,
    "race5": race5_vocab,
}


def make_preset(preset: str, name: str | None = None, **kwargs: Any) -> AttributeVocab:
    if preset not in PRESETS:
        raise FairllavaError(f"unknown attribute preset {preset!r} (expected one of {sorted(PRESETS)})")
    factory = PRESETS[preset]
    return factory(name=name or ("race" if preset.startswith("race") else preset), **kwargs)


def vocabs_from_config(cfg: Mapping[str, Any]) -> dict[str, AttributeVocab]:
    """Build vocabularies from a config mapping ``{attr_name: spec}``.

    ``spec`` is a preset name string (``"race8"``) or a mapping with either ``preset`` (+ preset options
    such as ``unknown``, ``unknown_class``, ``merge_minor``) or ``classes`` (+ ``aliases``, ``unknown``,
    ``rules: [{match, pattern, class}]``, ``excluded``). Unknown keys are errors (METHOD.md §12 #4).
    """
    if not isinstance(cfg, Mapping):
        raise FairllavaError(f"attribute vocabularies: expected a mapping name -> spec, got {type(cfg).__name__}")
    out: dict[str, AttributeVocab] = {}
    for name, spec in cfg.items():
        where = f"attribute vocabularies.{name}"
        if isinstance(spec, str):
            out[name] = make_preset(spec, name=name)
            continue
        if not isinstance(spec, Mapping):
            raise FairllavaError(f"{where}: expected a preset name or a mapping, got {type(spec).__name__}")
        spec = dict(spec)
        if "preset" in spec:
            preset = spec.pop("preset")
            allowed = {"unknown", "unknown_class", "merge_minor"}
            bad = set(spec) - allowed
            if bad:
                raise FairllavaError(f"{where}: unknown key(s) {sorted(bad)} for a preset (allowed {sorted(allowed)})")
            try:
                out[name] = make_preset(preset, name=name, **spec)
            except TypeError as e:
                raise FairllavaError(f"{where}: {e}") from None
            continue
        allowed = {"classes", "aliases", "unknown", "rules", "excluded"}
        bad = set(spec) - allowed
        if bad:
            raise FairllavaError(f"{where}: unknown key(s) {sorted(bad)} (allowed {sorted(allowed)})")
        if "classes" not in spec:
            raise FairllavaError(f"{where}: needs 'preset' or 'classes'")
        rules = []
        for j, r in enumerate(spec.get("rules") or []):
            if not isinstance(r, Mapping) or set(r) != {"match", "pattern", "class"}:
                raise FairllavaError(f"{where}.rules[{j}]: expected {{match, pattern, class}}, got {r!r}")
            try:
                rules.append(MatchRule(r["match"], str(r["pattern"]), str(r["class"])))
            except ValueError as e:
                raise FairllavaError(f"{where}.rules[{j}]: {e}") from None
        try:
            out[name] = AttributeVocab(
                name,
                spec["classes"],
                spec.get("aliases") or {},
                unknown=spec.get("unknown", "error"),
                rules=rules,
                excluded=spec.get("excluded") or (),
            )
        except ValueError as e:
            raise FairllavaError(f"{where}: {e}") from None
    return out


def parse_vocab_options(options: Iterable[str]) -> dict[str, AttributeVocab]:
    """CLI ``--vocab race=race8 --vocab tone=light,dark`` -> vocabularies (a preset name, or an explicit
    comma-separated class list)."""
    cfg: dict[str, Any] = {}
    for opt in options:
        if "=" not in opt:
            raise FairllavaError(f"--vocab {opt!r}: expected NAME=PRESET or NAME=CLASS,CLASS,... "
                                 f"(presets: {sorted(PRESETS)})")
        k, v = (s.strip() for s in opt.split("=", 1))
        if not k or not v:
            raise FairllavaError(f"--vocab {opt!r}: empty name or value")
        cfg[k] = {"classes": [c.strip() for c in v.split(",") if c.strip()]} if "," in v else v
    return vocabs_from_config(cfg)


def default_vocabs(attributes: Iterable[str]) -> dict[str, AttributeVocab]:
    """Vocabularies for the standard attribute names (``sex``, ``age_group``, ``race``)."""
    defaults = {"sex": "sex", "gender": "sex", "age_group": "age_group", "age": "age_group", "race": "race8"}
    out = {}
    for a in attributes:
        if a not in defaults:
            raise FairllavaError(f"attribute {a!r}: no default vocabulary (configure one of {sorted(PRESETS)})")
        out[a] = make_preset(defaults[a], name=a)
    return out


# -- missing-label policy ------------------------------------------------------------------------
@dataclass
class MissingReport:
    """What a missing-label policy did: per-attribute missing counts and how many records were dropped."""

    policy: str
    n_in: int = 0
    n_out: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    dropped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "n_in": self.n_in, "n_out": self.n_out, "missing": dict(self.missing),
                "dropped": len(self.dropped_ids)}


def apply_missing_policy(
    records: Iterable[dict], vocabs: Mapping[str, AttributeVocab], policy: str = "ignore"
) -> tuple[list[dict], MissingReport]:
    """Apply a per-run policy to records whose configured attributes are missing (or encode to ignore).

    ``drop``: remove them; ``ignore``: keep them (their labels are masked in the MI term);
    ``error``: raise naming the first offending id. Unknown strings still raise per the vocabulary.
    """
    if policy not in MISSING_POLICIES:
        raise FairllavaError(f"missing-label policy: expected one of {MISSING_POLICIES}, got {policy!r}")
    rep = MissingReport(policy=policy, missing={a: 0 for a in vocabs})
    kept: list[dict] = []
    for rec in records:
        rep.n_in += 1
        attrs = rec.get("attributes") or {}
        missing = [a for a, v in vocabs.items() if v.encode(attrs.get(a)) == IGNORE_INDEX]
        for a in missing:
            rep.missing[a] += 1
        if missing and policy == "error":
            raise FairllavaError(f"id={rec.get('id')}: missing attribute(s) {', '.join(missing)} (policy: error)")
        if missing and policy == "drop":
            rep.dropped_ids.append(str(rec.get("id")))
            continue
        kept.append(rec)
    rep.n_out = len(kept)
    return kept, rep
