"""Hook-based hidden-state capture equals output_hidden_states on tiny HF models built from configs."""
import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fairllava.models.hidden_states import HiddenStateCapture, decoder_layers, image_token_mask

IMAGE_TOKEN = 199
N_IMAGE_TOKENS = 16  # (32 / 8)^2 patches; "default" strategy drops CLS


def tiny_llava(n_layers=3, seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=200, max_position_embeddings=128)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg).eval()


def llava_inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix, suffix = torch.randint(3, 190, (b, 3), generator=g), torch.randint(3, 190, (b, 6), generator=g)
    ids = torch.cat([prefix, torch.full((b, N_IMAGE_TOKENS), IMAGE_TOKEN), suffix], dim=1)
    attn = torch.ones_like(ids)
    attn[1, -2:] = 0  # right padding on one row
    return {"input_ids": ids, "attention_mask": attn, "pixel_values": torch.randn(b, 3, 32, 32, generator=g)}


def test_decoder_layers_finds_the_language_model():
    model = tiny_llava()
    parts = decoder_layers(model)
    assert parts.layers is model.model.language_model.layers and len(parts.layers) == 3
    assert parts.norm is model.model.language_model.norm
    with pytest.raises(ValueError, match="no language-model decoder found"):
        decoder_layers(model.model.vision_tower)


def test_capture_equals_output_hidden_states_llava():
    model = tiny_llava()
    inputs = llava_inputs()
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
        assert len(ref) == 4
        with HiddenStateCapture(model, [0, 1, 2, 3]) as cap:
            model(**inputs)
    for i in range(4):
        assert torch.equal(cap.states[i], ref[i]), i
    # index 0 really is the embedding output with image features spliced in (not the token embeddings)
    emb = model.get_input_embeddings()(inputs["input_ids"].clamp(max=198))
    assert not torch.allclose(cap.states[0][:, 3:19], emb[:, 3:19])
    assert torch.allclose(cap.states[0][:, :3], emb[:, :3])
    # negative indices count from the end; only the requested states are kept
    with torch.no_grad(), HiddenStateCapture(model, [-1, 2]) as cap2:
        model(**inputs)
    assert sorted(cap2.states) == [2, 3] and torch.equal(cap2.get()[0], ref[3])


def test_capture_keeps_graph_through_peft_and_checkpointing():
    from peft import LoraConfig, get_peft_model

    model = tiny_llava()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    assert decoder_layers(peft_model).layers is model.model.language_model.layers
    inputs = llava_inputs()
    with torch.no_grad():
        ref = peft_model(**inputs, output_hidden_states=True).hidden_states
    peft_model.train()
    model.activation_checkpointing_enable()
    assert model.model.language_model.layers[1].gradient_checkpointing
    model.enable_input_require_grads()
    with HiddenStateCapture(peft_model, [2]) as cap:
        out = peft_model(**inputs)
        h = cap.states[2]
        assert torch.allclose(h, ref[2], atol=1e-6)
        assert h.requires_grad and h.grad_fn is not None
        (h.pow(2).mean() + 0 * out.logits.sum()).backward()
        assert cap.states[2] is h  # the backward recompute must not overwrite the captured state
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n and "layers.0." in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    # LoRA in the block after the tapped state gets no gradient from it
    after = [p for n, p in peft_model.named_parameters() if "lora_" in n and "layers.2." in n]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in after)


def test_capture_qwen2_and_llama_causal_lm():
    torch.manual_seed(0)
    for model in (
        Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=100)),
        LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=100)),
    ):
        ids = torch.randint(0, 100, (2, 7))
        with torch.no_grad():
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states
            with HiddenStateCapture(model, range(3)) as cap:
                model(input_ids=ids)
        assert all(torch.equal(cap.states[i], ref[i]) for i in range(3)), type(model).__name__


def test_index_past_depth_and_missing_state():
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"hidden-state index 4 is past the model depth: expected 0..3"):
        HiddenStateCapture(model, [1, 4])
    cap = HiddenStateCapture(model, [1])
    with pytest.raises(KeyError, match="hidden state 1 was not captured"):
        cap.get()


def test_image_token_mask():
    model = tiny_llava()
    inputs = llava_inputs()
    mask = image_token_mask(inputs["input_ids"], model)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [N_IMAGE_TOKENS] * 2
    assert torch.equal(mask, image_token_mask(inputs["input_ids"], model.config))
    assert not image_token_mask(torch.tensor([[1, 2, 3]]), model).any()  # text-only row: all False
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=100))
    with pytest.raises(ValueError, match="no image_token_id / image_token_index"):
        image_token_mask(torch.tensor([[1, 2]]), llama)
