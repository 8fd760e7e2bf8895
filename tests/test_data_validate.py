"""A corpus of malformed records: each gives its documented one-line problem (file:line (id=...): ...)."""
import json
import os

import pytest
from typer.testing import CliRunner

from fairllava.data.attributes import default_vocabs, race5_vocab
from fairllava.data.dataset import VLMDataset
from fairllava.data.validate import validate_dataset
from fairllava.errors import FairllavaError
from test_data_helpers import write_image

PROMPT = "<image>\nDescribe the image."


def good(i="a", image="img/a.png", **kw):
    rec = {"id": i, "group_id": f"g{i}", "image": image,
           "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": "An answer."}],
           "attributes": {"sex": "F", "age_group": "45-65", "race": "White"}}
    rec.update(kw)
    return rec


def conv(human, answer="An answer.", *extra):
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}, *extra]


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "images"
    write_image(r / "img" / "a.png")
    write_image(r / "img" / "b.png")
    (r / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (tmp_path / "outside.png").write_bytes((r / "img" / "a.png").read_bytes())
    os.symlink(tmp_path / "outside.png", r / "img" / "link.png")
    return r


# (name, line written as the 2nd line of the file, expected message fragment)
CASES = [
    ("bad_json", '{"id": "x", "image": ', "invalid JSON"),
    ("not_object", "[1, 2]", "expected a JSON object, got list"),
    ("missing_id", {k: v for k, v in good().items() if k != "id"}, "missing field(s) id"),
    ("int_id", good(i=7), "'id' must be a non-empty string, got 7"),
    ("empty_id", good(i=" "), "'id' must be a non-empty string"),
    ("missing_image", good("x", image="img/nope.png"), "image not found: img/nope.png"),
    ("corrupt_image", good("x", image="img/corrupt.png"), "image does not decode: img/corrupt.png"),
    ("escape_dotdot", good("x", image="../outside.png"), "escapes the image root"),
    ("escape_absolute", good("x", image="/etc/hostname"), "escapes the image root"),
    ("escape_symlink", good("x", image="img/link.png"), "escapes the image root"),
    ("unknown_race", good("x", attributes={"race": "MARTIAN"}), "attribute race: unknown value 'MARTIAN'"),
    ("unknown_sex", good("x", attributes={"sex": "X"}), "attribute sex: unknown value 'X'"),
    ("age_group_abc", good("x", attributes={"age_group": "abc"}), "attribute age_group: unknown value 'abc'"),
    ("age_group_number", good("x", attributes={"age_group": 57}), "attribute 'age_group' must be a string class name or null, got int 57"),
    ("meta_age_abc", good("x", meta={"age": "abc"}), "meta.age must be a number or null, got 'abc'"),
    ("no_placeholder", good("x", conversations=conv("Describe.")), "expected exactly one <image> (in the first human turn) for one image, found 0"),
    ("two_placeholders", good("x", conversations=conv("<image>\n<image>\nDescribe.")), "found 2 (2 in the first turn)"),
    ("placeholder_in_answer_turn", good("x", conversations=conv("Describe.", "<image> answer")), "found 1 (0 in the first turn)"),
    ("placeholder_without_image", good("x", image=None), "<image> placeholder present (1x) but the record has no image"),
    ("empty_answer", good("x", conversations=conv(PROMPT, "   ")), "conversations[1]: empty answer"),
    ("gpt_first", good("x", conversations=[{"from": "gpt", "value": "a"}, {"from": "human", "value": PROMPT}]), "conversations[0].from: expected 'human'"),
    ("human_only", good("x", conversations=[{"from": "human", "value": PROMPT}]), "needs a human turn followed by a gpt answer"),
    ("turn_without_value", good("x", conversations=[{"from": "human"}]), "conversations[0]: expected an object with 'from' and 'value'"),
    ("attributes_list", good("x", attributes=["F"]), "'attributes' must be an object, got list"),
    ("negative_weight", good("x", weight=-1), "'weight' must be a non-negative number"),
    ("duplicate_id", good("a"), "duplicate id (first at"),
    ("image_not_string", good("x", image=5), "'image' must be a non-empty string path or null"),
]


@pytest.mark.parametrize("name,line,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_record(tmp_path, root, name, line, expected):
    path = tmp_path / f"{name}.jsonl"
    second = line if isinstance(line, str) else json.dumps(line)
    path.write_text(json.dumps(good()) + "\n" + second + "\n")
    res = validate_dataset(path, root)
    msgs = [str(p) for p in res.problems]
    assert len(msgs) >= 1, name
    assert all(m.startswith(f"{path}:2 (id=") for m in msgs), msgs  # every problem on the bad line, located
    assert any(expected in m for m in msgs), msgs
    assert not res.ok


def test_corpus_size():
    assert len(CASES) >= 20


def test_valid_file_has_no_problems_and_counts_groups(tmp_path, root):
    path = tmp_path / "ok.jsonl"
    recs = [good("a"), good("b", image="img/b.png", attributes={"sex": "male", "age_group": None, "race": "AIAN"}),
            good("c", image=None, conversations=conv("Text only."), attributes={})]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = validate_dataset(path, root)
    assert res.ok and res.n_records == 3
    assert res.groups["sex"] == {"F": 1, "M": 1, "<missing>": 1}
    assert res.groups["race"] == {"White": 1, "AIAN": 1, "<missing>": 1}
    res5 = validate_dataset(path, root, {"race": race5_vocab()})
    assert res5.groups["race"]["AIAN (excluded)"] == 1


def test_group_leak_across_files_and_missing_root(tmp_path, root):
    a, b = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    a.write_text(json.dumps(good("a")) + "\n")
    b.write_text(json.dumps(good("b", image="img/b.png", group_id="ga")) + "\n")
    res = validate_dataset([a, b], root)
    assert [str(p) for p in res.problems] == [f"{b}:1 (id=b): group_id 'ga' also appears in {a} (split leak)"]
    res = validate_dataset(a, None)
    assert "no image root was given" in str(res.problems[0])
    with pytest.raises(FairllavaError, match="file not found"):
        validate_dataset(tmp_path / "nope.jsonl", root)


def test_cli_validate(tmp_path, root):
    from fairllava.cli import app

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good()) + "\n" + json.dumps(good("b", image="../outside.png")) + "\n"
                    + json.dumps(good("c", image="img/b.png", attributes={"race": "MARTIAN"})) + "\n")
    r = CliRunner().invoke(app, ["validate", str(path), "--images", str(root)])
    assert r.exit_code == 1
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(str(path))]
    assert lines == [f"{path}:2 (id=b): image path '../outside.png' escapes the image root",
                     f"{path}:3 (id=c): attribute race: unknown value 'MARTIAN' (expected one of "
                     "['White', 'Black', 'Asian', 'Hispanic', 'Other', 'AIAN', 'NHPI', 'Unknown'] or a configured "
                     "alias; set unknown: ignore to mask it)"]
    path.write_text(json.dumps(good()) + "\n")
    r = CliRunner().invoke(app, ["validate", str(path), "--images", str(root), "--vocab", "race=race5"])
    assert r.exit_code == 0, r.output


def test_dataset_raises_located_errors(tmp_path, root):
    vocabs = default_vocabs(["sex", "race"])
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good()) + "\n" + json.dumps(good("b", attributes={"race": "MARTIAN"})) + "\n")
    with pytest.raises(FairllavaError, match=r"d.jsonl:2 \(id=b\): attribute race: unknown value"):
        VLMDataset(path, root, vocabs)
    path.write_text(json.dumps(good()) + "\n" + json.dumps(good("a")) + "\n")
    with pytest.raises(FairllavaError, match=r"d.jsonl:2 \(id=a\): duplicate id"):
        VLMDataset(path, root, vocabs)
    ds = VLMDataset([good("x", image="../outside.png"), good("y", image="img/corrupt.png")], root, vocabs)
    with pytest.raises(FairllavaError, match=r"\(id=x\): image path '../outside.png' escapes the image root"):
        ds[0]
    with pytest.raises(FairllavaError, match=r"\(id=y\): cannot decode image corrupt.png"):
        ds[1]
    assert ds.attr_ids[0] == {"sex": 1, "race": 0}
