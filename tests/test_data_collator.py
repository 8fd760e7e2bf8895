"""Collator round-trip on a tiny offline LlavaProcessor: answer-only labels, attributes, image mask."""
import pytest
import torch
from PIL import Image

from test_data_helpers import tiny_processor, write_image
from fairllava.data.attributes import IGNORE_INDEX, default_vocabs
from fairllava.data.collator import VLMCollator
from fairllava.data.dataset import VLMDataset
from fairllava.errors import FairllavaError

PROMPT = "<image>\nProvide a description of the findings in the radiology image."


@pytest.fixture(scope="module")
def proc():
    return tiny_processor()


def _items():
    return [
        {"id": "a", "image": Image.new("RGB", (40, 30), (10, 200, 30)),
         "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": "the heart size is normal."}],
         "attributes": {"sex": "F", "race": "WHITE", "age_group": "45-65"}},
        {"id": "b", "image": None,
         "conversations": [{"from": "human", "value": "describe"}, {"from": "gpt", "value": "no pleural effusion."}],
         "attributes": {"sex": None, "age_group": "66+"}},
        {"id": "c", "image": Image.new("RGB", (28, 28)),
         "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": "lungs are clear."}],
         "attributes": {"sex": "M", "race": "PATIENT DECLINED TO ANSWER"}, "weight": 2.5},
    ]


def test_train_batch_roundtrip(proc):
    vocabs = default_vocabs(["sex", "age_group", "race"])
    batch = VLMCollator(proc, vocabs, mode="train")(_items())
    tok = proc.tokenizer
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == (B, T) and batch["image_mask"].dtype == torch.bool
    answers = ["the heart size is normal.", "no pleural effusion.", "lungs are clear."]
    for b in range(B):
        lab = batch["labels"][b]
        kept = lab[lab != IGNORE_INDEX].tolist()
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]) == answers[b]
        # labels equal input ids wherever they are kept, and the answer sits right before the padding
        am = batch["attention_mask"][b].bool()
        assert torch.equal(batch["input_ids"][b][lab != IGNORE_INDEX], lab[lab != IGNORE_INDEX])
        n = int(am.sum())
        assert am[:n].all() and not am[n:].any()  # right padding
        assert (lab[n:] == IGNORE_INDEX).all()
        prompt = tok.decode(batch["input_ids"][b][: n - len(kept)])
        assert prompt.endswith("<|im_start|>assistant\n") and answers[b] not in prompt
    # image mask: 4 image tokens (28/14)^2 on the image rows, none on the text-only row
    assert batch["image_mask"].sum(1).tolist() == [4, 0, 4]
    assert (batch["input_ids"][batch["image_mask"]] == proc.image_token_id).all()
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert batch["attr_labels"]["sex"].tolist() == [1, IGNORE_INDEX, 0]
    assert batch["attr_labels"]["age_group"].tolist() == [1, 2, IGNORE_INDEX]
    assert batch["attr_labels"]["race"].tolist() == [0, IGNORE_INDEX, 7]
    assert batch["ids"] == ["a", "b", "c"]
    assert batch["weights"].tolist() == [1.0, 1.0, 2.5]


def test_every_configured_attribute_always_present(proc):
    items = _items()[1:2]
    batch = VLMCollator(proc, default_vocabs(["sex", "race"]))(items)
    assert set(batch["attr_labels"]) == {"sex", "race"}
    assert batch["attr_labels"]["race"].tolist() == [IGNORE_INDEX]
    assert "weights" not in batch


def test_generate_mode_left_padding(proc):
    batch = VLMCollator(proc, default_vocabs(["sex"]), mode="generate")(_items())
    assert "labels" not in batch
    am = batch["attention_mask"]
    assert am[:, -1].all()  # left padding: every row ends at the last column
    for b in range(3):
        n = int(am[b].sum())
        assert not am[b, : am.shape[1] - n].any()
        text = proc.tokenizer.decode(batch["input_ids"][b][am[b].bool()])
        assert text.endswith("<|im_start|>assistant\n")
    assert batch["references"][1] == "no pleural effusion."


def test_truncation_cuts_answer_only(proc):
    c = VLMCollator(proc, {}, max_length=40)
    items = _items()[:1]
    full = VLMCollator(proc, {})(items)
    n_full = int(full["attention_mask"].sum())
    assert n_full > 40
    with pytest.raises(FairllavaError, match="id=a: prompt is .* tokens \\(4 image tokens\\)"):
        VLMCollator(proc, {}, max_length=20)(items)
    n_prompt = n_full - int((full["labels"] != IGNORE_INDEX).sum())
    c = VLMCollator(proc, {}, max_length=n_prompt + 2)
    batch = c(items)
    assert batch["input_ids"].shape[1] == n_prompt + 2
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 2
    assert batch["image_mask"].sum() == 4


def test_placeholder_mismatch_errors(proc):
    it = _items()[0]
    it["conversations"][0]["value"] = "no placeholder"
    with pytest.raises(FairllavaError, match="id=a: 0 <image> placeholder"):
        VLMCollator(proc, {})([it])


def test_image_token_id_override_and_no_template(proc):
    c = VLMCollator(proc, {}, image_token_id=proc.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    batch = c(_items()[1:2])
    assert batch["image_mask"].sum() == 2  # the override is honoured (two <|im_start|> tokens)
    tmpl = proc.tokenizer.chat_template
    proc.tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="chat template"):
            VLMCollator(proc, {})
    finally:
        proc.tokenizer.chat_template = tmpl


def test_dataset_to_collator(tmp_path, proc):
    import json

    write_image(tmp_path / "img" / "p1" / "x.jpg")
    recs = [{"id": "s1", "group_id": "p1", "image": "p1/x.jpg",
             "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": "lungs are clear."}],
             "attributes": {"sex": "female", "age_group": "0-44", "race": "Asian"}}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = VLMDataset(path, tmp_path / "img", default_vocabs(["sex", "age_group", "race"]))
    item = ds[0]
    assert item["image"].mode == "RGB" and item["attr_ids"] == {"sex": 1, "age_group": 0, "race": 2}
    batch = VLMCollator(proc, ds.vocabs)([item])
    assert batch["attr_labels"]["race"].tolist() == [2] and batch["image_mask"].sum() == 4


def test_tiny_llava_forward_on_collated_batch():
    """The batch feeds the real (tiny) HF LLaVA: image tokens match features, loss is finite."""
    from fairllava.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava()
    items = _items()
    batch = VLMCollator(processor, default_vocabs(["sex", "race"]))(items)
    n_img = int(batch["image_mask"].sum())
    assert n_img > 0 and n_img % 2 == 0 and batch["image_mask"][1].sum() == 0
    assert (batch["input_ids"][batch["image_mask"]] == model.config.image_token_index).all()
    for b, ans in enumerate(["the heart size is normal.", "no pleural effusion.", "lungs are clear."]):
        lab = batch["labels"][b]
        kept = lab[lab != IGNORE_INDEX].tolist()
        assert processor.tokenizer.decode(kept, skip_special_tokens=True) == ans
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert torch.isfinite(out.loss)


def test_processor_template_path_matches_tokenizer_path():
    """With only a processor template, content goes as HF multimodal parts; the prompt is the same."""
    from fairllava.models.tiny import CHAT_TEMPLATE, build_tiny_processor

    processor = build_tiny_processor()
    items = _items()
    via_tok = VLMCollator(processor, {})(items)
    processor.tokenizer.chat_template = None
    processor.chat_template = CHAT_TEMPLATE
    c = VLMCollator(processor, {})
    assert c._template_source == "processor"
    via_proc = c(items)
    for k in ("input_ids", "labels", "image_mask", "attention_mask"):
        assert torch.equal(via_tok[k], via_proc[k]), k


def test_multi_turn_and_text_only_tokenizer(proc):
    it = _items()[1]
    it["conversations"] = it["conversations"] + [{"from": "human", "value": "more"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(FairllavaError, match="id=b: VLMCollator supports single-turn records"):
        VLMCollator(proc, {})([it])
    tok_only = VLMCollator(proc.tokenizer, {"sex": default_vocabs(["sex"])["sex"]})
    batch = tok_only(_items()[1:2])
    assert "pixel_values" not in batch and not batch["image_mask"].any()
    with pytest.raises(FairllavaError, match="text-only tokenizer"):
        tok_only(_items()[:1])


def test_task_labels_for_conditional_mi(proc):
    items = _items()
    items[0]["label"], items[1]["label"], items[2]["label"] = "NV", None, "MEL"
    batch = VLMCollator(proc, {}, mode="train", task_labels=["MEL", "NV", "VASC"])(items)
    assert batch["task_labels"].tolist() == [1, IGNORE_INDEX, 0]
    assert "task_labels" not in VLMCollator(proc, {}, mode="train")(items)
    items[2]["label"] = "BCC"
    with pytest.raises(FairllavaError, match="id=c: label 'BCC'"):
        VLMCollator(proc, {}, mode="train", task_labels=["MEL", "NV", "VASC"])(items)
