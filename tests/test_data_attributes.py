import pytest

from fairllava.data.attributes import (
    AGE_GROUP, HAM_AGE_BINS, IGNORE_INDEX, MIMIC_AGE_BINS, RACE5, RACE8, SEX, AttributeVocab,
    age_to_group, apply_missing_policy, map_race, parse_vocab_options, race5_vocab, race8_vocab,
    vocabs_from_config,
)
from fairllava.errors import FairllavaError


def test_sex_vocab_aliases_and_missing():
    v = SEX.copy()
    assert [v.encode(x) for x in ["M", "F", "male", "Female", "m", " f "]] == [0, 1, 0, 1, 0, 1]
    assert v.encode(None) == v.encode("") == v.encode(float("nan")) == IGNORE_INDEX
    assert v.counts["missing"] == 3
    assert v.decode(1) == "F" and v.decode(IGNORE_INDEX) is None
    with pytest.raises(FairllavaError, match="unknown value 'unknown'"):
        v.encode("unknown")
    with pytest.raises(ValueError):
        v.decode(2)


def test_unknown_ignore_counts():
    v = AttributeVocab("sex", ["M", "F"], unknown="ignore")
    assert v.encode("other") == IGNORE_INDEX and v.encode("x") == IGNORE_INDEX
    assert v.counts["ignored_unknown"] == 2


def test_non_string_values_rejected():
    with pytest.raises(FairllavaError, match="expected a string"):
        AGE_GROUP.copy().encode(57)


@pytest.mark.parametrize("age,mimic,ham", [
    (0, "0-44", "0-44"), (44, "0-44", "0-44"), (44.5, "45-65", "0-44"), (45, "45-65", "45-65"),
    (65, "45-65", "45-65"), (65.5, "66+", "45-65"), (66, "66+", "66+"), (91, "66+", "66+"), ("70", "66+", "66+"),
])
def test_age_bins(age, mimic, ham):
    assert age_to_group(age, MIMIC_AGE_BINS) == mimic
    assert age_to_group(age, HAM_AGE_BINS) == ham


def test_age_bad_values():
    assert age_to_group(None) is None and age_to_group("") is None and age_to_group(float("nan")) is None
    with pytest.raises(FairllavaError, match="expected a number, got 'abc'"):
        age_to_group("abc")
    with pytest.raises(FairllavaError, match="outside"):
        age_to_group(-3)
    with pytest.raises(FairllavaError):
        age_to_group(True)


@pytest.mark.parametrize("raw,cls", [
    ("WHITE", "White"), ("white - other european", "White"), ("WHITE - BRAZILIAN", "White"),
    ("BLACK/AFRICAN AMERICAN", "Black"), ("BLACK/CAPE VERDEAN", "Black"), ("ASIAN - CHINESE", "Asian"),
    ("HISPANIC/LATINO - PUERTO RICAN", "Hispanic"), ("HISPANIC OR LATINO", "Hispanic"),
    ("SOUTH AMERICAN", "Hispanic"), ("OTHER", "Other"), ("MULTIPLE RACE/ETHNICITY", "Other"),
    ("PORTUGUESE", "Other"), ("AMERICAN INDIAN/ALASKA NATIVE", "AIAN"),
    ("NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "NHPI"), ("UNKNOWN", "Unknown"),
    ("UNABLE TO OBTAIN", "Unknown"), ("PATIENT DECLINED TO ANSWER", "Unknown"), ("", "Unknown"),
])
def test_race8_raw_rules(raw, cls):
    assert map_race(raw) == cls
    assert RACE8.classes.index(cls) == ["White", "Black", "Asian", "Hispanic", "Other", "AIAN", "NHPI",
                                        "Unknown"].index(cls)


def test_race8_unmatched_is_error_not_class7():
    with pytest.raises(FairllavaError, match="unknown value 'MARTIAN'"):
        RACE8.copy().encode("MARTIAN")
    assert map_race(None) is None


def test_race8_unknown_class_mask():
    v = race8_vocab(unknown_class="mask")
    assert v.num_classes == 7
    assert v.encode("PATIENT DECLINED TO ANSWER") == IGNORE_INDEX and v.counts["excluded"] == 1
    assert v.encode("WHITE") == 0


def test_race5_excludes_minor_and_unknown():
    v = race5_vocab()
    assert v.num_classes == 5
    assert [v.encode(x) for x in ["White", "Black", "Asian", "Hispanic", "Other"]] == [0, 1, 2, 3, 4]
    assert [v.encode(x) for x in ["AIAN", "NHPI", "Unknown"]] == [IGNORE_INDEX] * 3
    assert v.counts["excluded"] == 3
    m = race5_vocab(merge_minor=True)
    assert m.encode("AIAN") == 4 and m.encode("NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER") == 4
    assert m.encode("Unknown") == IGNORE_INDEX
    assert RACE5.classes == ["White", "Black", "Asian", "Hispanic", "Other"]


def test_vocabs_from_config_strict():
    v = vocabs_from_config({"race": "race8", "sex": {"preset": "sex", "unknown": "ignore"},
                            "site": {"classes": ["a", "b"], "rules": [{"match": "prefix", "pattern": "x", "class": "b"}]}})
    assert v["race"].num_classes == 8 and v["sex"].unknown == "ignore" and v["site"].encode("xyz") == 1
    with pytest.raises(FairllavaError, match="unknown key"):
        vocabs_from_config({"sex": {"preset": "sex", "bogus": 1}})
    with pytest.raises(FairllavaError, match="unknown attribute preset"):
        vocabs_from_config({"sex": "nope"})
    with pytest.raises(FairllavaError, match="not one of"):
        vocabs_from_config({"s": {"classes": ["a"], "aliases": {"x": "b"}}})
    with pytest.raises(FairllavaError, match="NAME=PRESET"):
        parse_vocab_options(["race"])
    v = parse_vocab_options(["race=light,dark", "sex=sex"])
    assert v["race"].classes == ["light", "dark"] and v["race"].encode("Dark") == 1 and v["sex"].num_classes == 2


def test_missing_policy():
    vocabs = {"sex": SEX.copy(), "age_group": AGE_GROUP.copy()}
    recs = [{"id": "a", "attributes": {"sex": "F", "age_group": "0-44"}},
            {"id": "b", "attributes": {"sex": None, "age_group": "66+"}},
            {"id": "c", "attributes": {"age_group": None}}]
    kept, rep = apply_missing_policy(recs, vocabs, "drop")
    assert [r["id"] for r in kept] == ["a"] and rep.dropped_ids == ["b", "c"]
    assert rep.missing == {"sex": 2, "age_group": 1}
    kept, rep = apply_missing_policy(recs, vocabs, "ignore")
    assert len(kept) == 3 and rep.to_dict()["dropped"] == 0
    with pytest.raises(FairllavaError, match="id=b: missing attribute"):
        apply_missing_policy(recs, vocabs, "error")
    with pytest.raises(FairllavaError, match="policy"):
        apply_missing_policy(recs, vocabs, "keep")
