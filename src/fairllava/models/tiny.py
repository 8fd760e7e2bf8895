"""A tiny, random, fully offline LLaVA (HF ``LlavaForConditionalGeneration`` + ``LlavaProcessor``).

Why: every unit test, the CI smoke demo and the benchmarks need a *real* HF vision-language model
(same classes, same processor, same chat-template path as LLaVA-1.5) that builds in well under a
second with no download. Only the sizes are tiny; nothing is mocked.

Layout: CLIP vision tower (hidden 32, 2 layers, 32 px, patch 8 -> 16 patch tokens after the CLS
token is dropped) -> ``gelu`` 2-layer projector -> Llama LM (hidden 64, 4 blocks). The tokenizer is
a byte-level BPE trained in code on a fixed clinical word list, so any text round-trips exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"

# ChatML-like; accepts plain-string content (our records: "<image>\n...") and HF multimodal
# content lists ([{"type": "image"}, {"type": "text", "text": ...}]).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A fixed corpus so that the BPE merges (and therefore token ids) are identical on every machine.
_WORDS = (
    "the a an and or of in on with without is are was were no not there normal abnormal heart lung lungs "
    "chest size mediastinum mediastinal contour contours silhouette cardiac cardiomegaly enlarged stable "
    "pleural effusion effusions pneumothorax pneumonia consolidation opacity opacities atelectasis edema "
    "pulmonary vascular congestion fracture fractures rib ribs bony structures intact clear focal airspace "
    "disease acute process findings impression right left bilateral lower upper lobe base bases mild "
    "moderate small large new unchanged compared prior study interval increase decrease lesion benign "
    "malignant melanoma nevus nevi keratosis carcinoma basal cell dermatofibroma vascular skin image "
    "describe report what is shown this patient answer yes no question diagnosis likely seen visible "
    "device tube line catheter pacemaker support devices calcified granuloma nodule nodules mass hilar "
    "spine thoracic degenerative changes osseous soft tissue diaphragm hemidiaphragm costophrenic angle "
    "angles blunting minimal trace likely represents may be could within limits negative positive male "
    "female age group race sex old young years"
).split()
_CORPUS = [" ".join(_WORDS[i : i + 12]) + "." for i in range(0, len(_WORDS), 12)] + [
    w.capitalize() for w in _WORDS
] + ["0 1 2 3 4 5 6 7 8 9 10 100 , . : ; ( ) - / ? !"]


def build_tiny_tokenizer(vocab_size: int = 640, with_image_token: bool = True):
    """A small byte-level BPE tokenizer with ``<s>``/``<|im_end|>``/``<pad>``/``<image>`` and a ChatML template.

    ``with_image_token=False`` leaves ``<image>`` out (an original-LLaVA-style LM tokenizer, for converter tests).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START] + ([IMAGE_TOKEN] if with_image_token else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = tk.token_to_id(BOS_TOKEN)
    # Llama/Vicuna-style: BOS is prepended by the tokenizer, not by the chat template.
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN} if with_image_token else None,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=2048,
    )
    return tok


def build_tiny_processor(tokenizer=None, image_size: int = 32, patch_size: int = 8):
    """``LlavaProcessor`` over the tiny tokenizer and the PIL (torchvision-free) CLIP image processor."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )


def build_tiny_llava(
    seed: int = 0,
    *,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    text_hidden: int = 64,
    text_layers: int = 4,
    num_heads: int = 4,
    initializer_range: float = 0.02,
):
    """Build ``(LlavaForConditionalGeneration, LlavaProcessor)`` from configs with seeded random weights.

    The global torch RNG is left untouched (weights come from a forked RNG seeded with ``seed``).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = build_tiny_processor(image_size=image_size, patch_size=patch_size)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        initializer_range=initializer_range,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    gc = model.generation_config
    gc.bos_token_id = tok.bos_token_id
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.do_sample = False
    gc.num_beams = 1
    gc.suppress_tokens = [config.image_token_id]  # the placeholder must never be generated
    return model, processor


def save_tiny_llava(out_dir: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Write the tiny model and its processor to ``out_dir`` (loadable with ``load_vlm``)."""
    model, processor = build_tiny_llava(seed=seed, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "build_tiny_llava",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "save_tiny_llava",
]
