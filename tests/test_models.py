"""Tiny model, loading through the Auto classes, LoRA placement, adapter reload and merge."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fairllava.errors import FairllavaError
from fairllava.models.loading import (
    LoraSettings,
    apply_lora,
    image_token_id,
    load_vlm,
    lora_target_regex,
    merge_adapter,
    projector_module_name,
    trainable_parameter_names,
)
from fairllava.models.tiny import build_tiny_llava, save_tiny_llava


def _batch(processor, n=2, seed=0):
    rng = np.random.RandomState(seed)
    images = [Image.fromarray((rng.rand(40 + 3 * i, 36, 3) * 255).astype("uint8")) for i in range(n)]
    tok = processor.tokenizer
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"<image>\nDescribe the chest {'x ' * i}please."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(n)
    ]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _perturb_trainable(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_tiny_model_shapes_and_image_expansion():
    model, processor = build_tiny_llava(seed=0)
    b = _batch(processor)
    img_id = image_token_id(model)
    assert processor.tokenizer.convert_ids_to_tokens(img_id) == "<image>"
    # 32 px / patch 8 = 4x4 = 16 image tokens per sample after dropping CLS
    assert (b["input_ids"] == img_id).sum(1).tolist() == [16, 16]
    out = model(**b, output_hidden_states=True)
    assert out.logits.shape[:2] == b["input_ids"].shape
    assert out.logits.shape[-1] == len(processor.tokenizer)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1 == 5
    # tokenizer round-trips arbitrary text (byte-level BPE)
    text = "Heart size normal. Ünïcode 42% ok?"
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == text


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_tiny_llava(seed=0)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b, _ = build_tiny_llava(seed=0)
    c, _ = build_tiny_llava(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_save_and_load_vlm_roundtrip(tmp_path):
    model, processor = build_tiny_llava(seed=0)
    save_tiny_llava(tmp_path / "tiny", seed=0)
    m2, p2 = load_vlm(tmp_path / "tiny", dtype="float32")
    assert type(m2).__name__ == "LlavaForConditionalGeneration"
    b1, b2 = _batch(processor), _batch(p2)
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    assert torch.allclose(b1["pixel_values"], b2["pixel_values"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    with torch.no_grad():  # same weights; logits within fp32 kernel-path noise (see test_embedded's note)
        torch.testing.assert_close(model(**b1).logits, m2(**b2).logits, rtol=1e-5, atol=1e-5)
    assert image_token_id(m2) == image_token_id(model)


def test_load_vlm_errors(tmp_path):
    with pytest.raises(FairllavaError, match="not found"):
        load_vlm(tmp_path / "nope")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FairllavaError, match="adapter"):
        load_vlm(tmp_path / "adapter")
    with pytest.raises(ValueError, match="dtype"):
        save_tiny_llava(tmp_path / "t")
        load_vlm(tmp_path / "t", dtype="int8")


def test_image_token_id_missing_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(FairllavaError, match="image-token mask"):
        image_token_id(lm)


def test_lora_settings_validation():
    with pytest.raises(ValueError, match="r="):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.5)
    with pytest.raises(ValueError, match="target"):
        LoraSettings(target="everything")
    assert LoraSettings().to_dict() == {"r": 64, "alpha": 128, "dropout": 0.05, "target": "all-linear-lm",
                                        "train_projector": True, "shared_dropout": True, "fused_forward": True,
                                        "fp32_sum": "auto"}


def test_apply_lora_places_adapters_only_on_lm_linears():
    model, _ = build_tiny_llava(seed=0)
    import re

    regex = lora_target_regex(model)
    lm_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and n.startswith("model.language_model.")]
    assert len(lm_linears) == 4 * 7
    assert all(re.fullmatch(regex, n) for n in lm_linears)
    others = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in lm_linears]
    assert "lm_head" in others and any("vision_tower" in n for n in others)
    assert not any(re.fullmatch(regex, n) for n in others)
    assert projector_module_name(model) == "model.multi_modal_projector"

    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    names = trainable_parameter_names(pm)
    lora = [n for n in names if "lora_" in n]
    proj = [n for n in names if "multi_modal_projector" in n]
    assert len(lora) == 2 * 4 * 7
    assert all(".language_model." in n for n in lora)
    assert proj and all("modules_to_save" in n for n in proj)
    assert set(names) == set(lora) | set(proj)
    assert not any("vision_tower" in n or "lm_head" in n or "embed_tokens" in n for n in names)


def test_lora_step_changes_only_intended_parameters():
    model, processor = build_tiny_llava(seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    b = _batch(processor)
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = -100
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = pm(**b, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_B" in n for n in changed)
    assert any("multi_modal_projector.modules_to_save" in n for n in changed)
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in changed), sorted(changed)[:5]


def test_adapter_reloads_with_plain_peft_and_gives_identical_logits(tmp_path):
    from peft import PeftModel

    model, processor = build_tiny_llava(seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    _perturb_trainable(pm)
    b = _batch(processor)
    with torch.no_grad():
        ref = pm(**b).logits
        base_only = build_tiny_llava(seed=0)[0](**b).logits
    assert not torch.allclose(ref, base_only)  # the adapter (LoRA + projector) matters
    pm.save_pretrained(tmp_path / "adapter")
    fresh, _ = build_tiny_llava(seed=0)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():  # fp32 kernel paths may differ for reloaded tensors (test_embedded's note); the
        # adapter's effect (asserted above against the base model) is far larger than this tolerance
        torch.testing.assert_close(reloaded(**b).logits, ref, rtol=1e-5, atol=1e-5)


def test_merge_adapter_writes_a_plain_model_with_the_same_outputs(tmp_path):
    model, processor = build_tiny_llava(seed=0)
    save_tiny_llava(tmp_path / "base", seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    _perturb_trainable(pm)
    pm.save_pretrained(tmp_path / "adapter")
    b = _batch(processor)
    with torch.no_grad():
        ref = pm(**b).logits
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged, p2 = load_vlm(out, dtype="float32")
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**_batch(p2)).logits, ref, rtol=1e-4, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp leftovers
    with pytest.raises(FairllavaError, match="already exists"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")


def test_the_lm_head_gets_a_contiguous_input_with_the_same_logits():
    import torch

    from fairllava.models.loading import contiguous_head_input

    model, _ = build_tiny_llava(seed=0)
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    h = torch.randn(2, 5, head.in_features)
    before = head(h[:, -1:, :])
    assert contiguous_head_input(model) and contiguous_head_input(model)  # idempotent
    assert len(head._forward_pre_hooks) == 1
    after = head(h[:, -1:, :])
    assert seen == [False, True] and torch.equal(before, after)
