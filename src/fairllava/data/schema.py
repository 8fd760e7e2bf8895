"""The sample record schema (EVALUATION.md §1; DESIGN.md "Records").

Why: training, generation and evaluation all read the same JSONL; checking one record in one place
gives every consumer the same located, one-line error messages.
"""
from __future__ import annotations

from typing import Any

from ..errors import FairllavaError

IMAGE_PLACEHOLDER = "<image>"
REQUIRED_FIELDS = ("id", "conversations", "attributes")
OPTIONAL_FIELDS = ("group_id", "image", "label", "meta", "weight")


def locate(where: str | None, rec_id: Any) -> str:
    """``file:line (id=...)`` prefix used by every record problem."""
    rid = "?" if rec_id is None else rec_id
    return f"{where} (id={rid})" if where else f"(id={rid})"


def record_problems(rec: Any, *, require_group_id: bool = False) -> list[str]:
    """All schema problems of one record (messages without location). Empty list = valid."""
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    probs: list[str] = []
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if require_group_id and "group_id" not in rec:
        missing.append("group_id")
    if missing:
        probs.append(f"missing field(s) {', '.join(missing)}")
    rid = rec.get("id")
    if "id" in rec and (not isinstance(rid, str) or not rid.strip()):
        probs.append(f"'id' must be a non-empty string, got {rid!r}")
    gid = rec.get("group_id")
    if "group_id" in rec and (not isinstance(gid, str) or not gid.strip()):
        probs.append(f"'group_id' must be a non-empty string, got {gid!r}")
    image = rec.get("image")
    has_image = image is not None
    if has_image and (not isinstance(image, str) or not image.strip()):
        probs.append(f"'image' must be a non-empty string path or null, got {image!r}")
        has_image = False
    if "conversations" in rec:
        probs.extend(_conversation_problems(rec["conversations"], has_image))
    attrs = rec.get("attributes")
    if "attributes" in rec:
        if not isinstance(attrs, dict):
            probs.append(f"'attributes' must be an object, got {type(attrs).__name__}")
        else:
            for k, v in attrs.items():
                if v is not None and (isinstance(v, bool) or not isinstance(v, str)):
                    probs.append(f"attribute {k!r} must be a string class name or null, got {type(v).__name__} {v!r}")
    if "label" in rec and rec["label"] is not None and not isinstance(rec["label"], str):
        probs.append(f"'label' must be a string or null, got {type(rec['label']).__name__}")
    if "meta" in rec and rec["meta"] is not None and not isinstance(rec["meta"], dict):
        probs.append(f"'meta' must be an object, got {type(rec['meta']).__name__}")
    elif isinstance(rec.get("meta"), dict) and "age" in rec["meta"]:
        age = rec["meta"]["age"]
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float))):
            probs.append(f"meta.age must be a number or null, got {age!r}")
    if "weight" in rec:
        w = rec["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            probs.append(f"'weight' must be a non-negative number, got {w!r}")
    return probs


def _conversation_problems(conv: Any, has_image: bool) -> list[str]:
    if not isinstance(conv, list) or not conv:
        return ["'conversations' must be a non-empty list of {from, value} turns"]
    probs: list[str] = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return [f"conversations[{j}]: expected an object with 'from' and 'value'"]
        if not isinstance(turn["value"], str):
            return [f"conversations[{j}].value: expected a string, got {type(turn['value']).__name__}"]
        expected = "human" if j % 2 == 0 else "gpt"
        if turn["from"] != expected:
            return [f"conversations[{j}].from: expected {expected!r} (turns alternate human/gpt), got {turn['from']!r}"]
    if len(conv) < 2:
        probs.append("conversations: needs a human turn followed by a gpt answer")
    elif len(conv) % 2:
        probs.append("conversations: last turn must be a gpt answer")
    n_first = conv[0]["value"].count(IMAGE_PLACEHOLDER)
    n_total = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    if has_image:
        if n_first != 1 or n_total != 1:
            probs.append(
                f"expected exactly one {IMAGE_PLACEHOLDER} (in the first human turn) for one image, "
                f"found {n_total} ({n_first} in the first turn)"
            )
    elif n_total:
        probs.append(f"{IMAGE_PLACEHOLDER} placeholder present ({n_total}x) but the record has no image")
    for j in range(1, len(conv), 2):
        if not conv[j]["value"].strip():
            probs.append(f"conversations[{j}]: empty answer")
    return probs


def check_record(rec: Any, where: str | None = None, *, require_group_id: bool = False) -> dict:
    """Raise ``FairllavaError('file:line (id=...): problem')`` on the first schema problem."""
    probs = record_problems(rec, require_group_id=require_group_id)
    if probs:
        rid = rec.get("id") if isinstance(rec, dict) else None
        raise FairllavaError(f"{locate(where, rid)}: {probs[0]}")
    return rec


def prompt_and_answer(rec: dict) -> tuple[str, str]:
    """The first human value (with ``<image>``) and the first gpt answer (single-turn training)."""
    conv = rec["conversations"]
    return conv[0]["value"], conv[1]["value"]
