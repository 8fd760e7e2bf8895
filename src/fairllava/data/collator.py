"""Batch collation for any HF vision-language processor (DESIGN.md "Collator output").

Why: the fairness regularizer needs three things most VLM collators drop — attribute labels for
*every* configured attribute (METHOD.md §12 #2), an image-token mask defined on every row (§12 #12),
and labels restricted to the answer so the LM loss is not trained on prompts. Prompts go through the
model's own chat template, so training matches generation.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from ..errors import FairllavaError
from .attributes import IGNORE_INDEX, AttributeVocab
from .schema import IMAGE_PLACEHOLDER


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def resolve_image_token_id(processor: Any, image_token_id: int | None = None) -> int | None:
    """The model's image token id: explicit argument, else the processor's ``image_token_id`` /
    ``image_token``; ``None`` for a text-only tokenizer."""
    if image_token_id is not None:
        return int(image_token_id)
    tid = getattr(processor, "image_token_id", None)
    if tid is not None:
        return int(tid)
    tok = getattr(processor, "image_token", None)
    if tok is not None:
        tid = _tokenizer_of(processor).convert_tokens_to_ids(tok)
        unk = getattr(_tokenizer_of(processor), "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk):
            raise ValueError(f"image token {tok!r} is not in the tokenizer vocabulary")
        return int(tid)
    return None


class VLMCollator:
    """Items of :class:`~fairllava.data.dataset.VLMDataset` -> a model batch.

    ``mode="train"``: prompt + answer + EOS, right padding, ``labels`` = answer tokens (+EOS) only.
    ``mode="generate"``: prompt only (ending with the generation prompt), left padding, no labels;
    the batch also carries ``references`` (the gpt answers) for prediction files.
    Truncation to ``max_length`` only ever drops answer tokens; a sample whose prompt (image tokens
    included) does not fit raises naming its id.
    """

    def __init__(
        self,
        processor: Any,
        vocabs: Mapping[str, AttributeVocab] | None = None,
        mode: Literal["train", "generate"] = "train",
        max_length: int = 2048,
        *,
        image_token_id: int | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        task_labels: Sequence[str] | None = None,
    ) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"VLMCollator.mode: expected 'train' or 'generate', got {mode!r}")
        if max_length < 2:
            raise ValueError(f"VLMCollator.max_length: expected >= 2, got {max_length}")
        self.processor = processor
        self.tokenizer = _tokenizer_of(processor)
        self.vocabs = dict(vocabs or {})
        self.mode = mode
        self.max_length = int(max_length)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        # Task-label classes (e.g. the lesion codes): emitted as ``task_labels`` for the conditional MI estimate.
        self.task_labels = {str(c): i for i, c in enumerate(task_labels)} if task_labels else None
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = resolve_image_token_id(processor, image_token_id)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token")
        self.pad_token_id = int(pad)
        if self.tokenizer.eos_token_id is None and mode == "train":
            raise ValueError("tokenizer has no EOS token; cannot terminate answers")
        self._template_source = self._pick_template()

    # -- prompt rendering ------------------------------------------------------------------------
    def _pick_template(self) -> str:
        if self.chat_template is not None:
            return "explicit"
        if getattr(self.tokenizer, "chat_template", None):
            return "tokenizer"
        if self.processor is not self.tokenizer and getattr(self.processor, "chat_template", None):
            return "processor"
        raise ValueError(
            "neither the processor nor its tokenizer has a chat template; pass chat_template=... to VLMCollator"
        )

    def render_prompt(self, human: str) -> str:
        """The user turn rendered with the chat template, ending with the generation prompt."""
        messages: list[dict] = []
        if self._template_source == "processor":
            if self.system_prompt:
                messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            content: list[dict] = []
            parts = human.split(IMAGE_PLACEHOLDER)
            for j, part in enumerate(parts):
                if j:
                    content.append({"type": "image"})
                if part:
                    content.append({"type": "text", "text": part})
            messages.append({"role": "user", "content": content})
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            if self.system_prompt:
                messages.append({"role": "system", "content": self.system_prompt})
            messages.append({"role": "user", "content": human})
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
            if self.image_token and self.image_token != IMAGE_PLACEHOLDER:
                text = text.replace(IMAGE_PLACEHOLDER, self.image_token)
        return text

    # -- per sample --------------------------------------------------------------------------------
    def _encode_prompt(self, item: dict) -> tuple[list[int], dict[str, torch.Tensor]]:
        conv = item["conversations"]
        if len(conv) != 2:
            raise FairllavaError(
                f"id={item['id']}: VLMCollator supports single-turn records (human, gpt); got {len(conv)} turns"
            )
        prompt = self.render_prompt(conv[0]["value"])
        image = item.get("image")
        n_ph = conv[0]["value"].count(IMAGE_PLACEHOLDER)
        if (image is None) != (n_ph == 0) or n_ph > 1:
            raise FairllavaError(
                f"id={item['id']}: {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) for {0 if image is None else 1} image(s)"
            )
        if self.processor is self.tokenizer:
            if image is not None:
                raise FairllavaError(f"id={item['id']}: an image was given but the processor is a text-only tokenizer")
            enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        elif image is not None:
            enc = self.processor(text=[prompt], images=[image], add_special_tokens=False, return_tensors="pt")
        else:
            enc = self.processor(text=[prompt], add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        extras = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)}
        return ids, extras

    def _encode_answer(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return list(ids) + [int(self.tokenizer.eos_token_id)]

    def _fit(self, item_id: str, prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
        """Truncate only the answer; never cut the prompt (which holds the image tokens)."""
        if len(prompt_ids) + len(answer_ids) <= self.max_length:
            return prompt_ids, answer_ids
        need = len(prompt_ids) + (1 if self.mode == "train" else 0)
        if need > self.max_length:
            n_img = sum(1 for t in prompt_ids if t == self.image_token_id) if self.image_token_id is not None else 0
            raise FairllavaError(
                f"id={item_id}: prompt is {len(prompt_ids)} tokens ({n_img} image tokens) but max_length is "
                f"{self.max_length}; truncation would cut the prompt/image tokens — raise max_length"
            )
        return prompt_ids, answer_ids[: self.max_length - len(prompt_ids)]

    # -- batch ------------------------------------------------------------------------------------
    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        if not items:
            raise ValueError("VLMCollator: empty batch")
        seqs: list[list[int]] = []
        labs: list[list[int]] = []
        extras: list[dict[str, torch.Tensor]] = []
        for it in items:
            p_ids, ex = self._encode_prompt(it)
            if self.mode == "train":
                a_ids = self._encode_answer(it["conversations"][1]["value"])
                p_ids, a_ids = self._fit(it["id"], p_ids, a_ids)
                seqs.append(p_ids + a_ids)
                labs.append([IGNORE_INDEX] * len(p_ids) + a_ids)
            else:
                p_ids, _ = self._fit(it["id"], p_ids, [])
                seqs.append(p_ids)
            extras.append(ex)
        T = max(len(s) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(seqs):
            n = len(s)
            sl = slice(0, n) if self.mode == "train" else slice(T - n, T)
            input_ids[b, sl] = torch.tensor(s, dtype=torch.long)
            attention_mask[b, sl] = 1
            if self.mode == "train":
                labels[b, sl] = torch.tensor(labs[b], dtype=torch.long)
        if self.image_token_id is not None:
            image_mask = (input_ids == self.image_token_id) & attention_mask.bool()
        else:
            image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update(_merge_extras(extras))
        if self.mode == "train":
            batch["labels"] = labels
        batch["image_mask"] = image_mask
        batch["attr_labels"] = self._attr_labels(items)
        batch["ids"] = [str(it["id"]) for it in items]
        if self.task_labels is not None:
            batch["task_labels"] = self._task_labels(items)
        if any("weight" in it for it in items):
            batch["weights"] = torch.tensor([float(it.get("weight", 1.0)) for it in items], dtype=torch.float32)
        if self.mode == "generate":
            batch["references"] = [it["conversations"][1]["value"] if len(it["conversations"]) > 1 else None
                                   for it in items]
        return batch

    def _task_labels(self, items: Sequence[dict]) -> torch.Tensor:
        """Record ``label`` -> class id; a missing label is IGNORE_INDEX, an unknown one an error naming the id."""
        vals = []
        for it in items:
            lab = it.get("label")
            if lab is None:
                vals.append(IGNORE_INDEX)
            elif str(lab) in self.task_labels:
                vals.append(self.task_labels[str(lab)])
            else:
                raise FairllavaError(f"id={it.get('id')}: label {lab!r} is not one of the task labels "
                                     f"{sorted(self.task_labels)}")
        return torch.tensor(vals, dtype=torch.long)

    def _attr_labels(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for name, vocab in self.vocabs.items():
            vals = []
            for it in items:
                ids = it.get("attr_ids")
                if ids is not None and name in ids:
                    vals.append(int(ids[name]))
                else:
                    try:
                        vals.append(vocab.encode((it.get("attributes") or {}).get(name)))
                    except FairllavaError as e:
                        raise FairllavaError(f"id={it.get('id')}: {e}") from None
            out[name] = torch.tensor(vals, dtype=torch.long)
        return out


def _merge_extras(extras: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-sample processor outputs (``pixel_values``, ``image_sizes``, ...) over image rows."""
    keys: list[str] = []
    for ex in extras:
        for k in ex:
            if k not in keys:
                keys.append(k)
    out = {}
    for k in keys:
        parts = [ex[k] for ex in extras if k in ex]
        try:
            out[k] = torch.cat(parts, dim=0)
        except RuntimeError as e:
            raise FairllavaError(f"VLMCollator: cannot batch processor output {k!r} of different shapes ({e})") from None
    return out
