"""Original-LLaVA-format checkpoint -> HF LLaVA: exact logits against a manual LLaVA forward."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fairllava.errors import FairllavaError
from fairllava.models.convert import VICUNA_V1_TEMPLATE, convert_llava_checkpoint
from fairllava.models.loading import image_token_id, load_vlm
from fairllava.models.tiny import build_tiny_tokenizer


def _make_clip(folder, seed):
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(folder)  # a full CLIP folder, like openai/clip-vit-large-patch14-336
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def _make_original_checkpoint(folder, clip_dir, *, tower_in_ckpt=None, fmt="bin", extra_cfg=None):
    """A fake LLaVA-1.5 checkpoint: LLaMA weights + model.mm_projector.{0,2} + config referencing the tower."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(with_image_token=False)
    lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(3)
    lm = LlamaForCausalLM(lcfg)
    with torch.no_grad():  # larger weights than the default init, so differences would show
        for p in lm.parameters():
            p.mul_(5.0)
    state = dict(lm.state_dict())
    g = torch.Generator().manual_seed(4)
    state["model.mm_projector.0.weight"] = torch.randn(48, 32, generator=g) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(48, generator=g) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(48, 48, generator=g) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(48, generator=g) * 0.1
    if tower_in_ckpt is not None:
        # original LLaVA saves the tower under model.vision_tower.vision_tower.<HF-4 CLIPVisionModel keys>
        for k, v in tower_in_ckpt.items():
            state["model.vision_tower.vision_tower.vision_model." + k] = v.clone()
    folder.mkdir(parents=True)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        keys = sorted(state)
        save_file({k: state[k].contiguous() for k in keys[: len(keys) // 2]}, str(folder / "model-00001-of-00002.safetensors"))
        save_file({k: state[k].contiguous() for k in keys[len(keys) // 2:]}, str(folder / "model-00002-of-00002.safetensors"))
    cfg = lcfg.to_dict()
    cfg.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                "mm_vision_tower": str(clip_dir), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False})
    cfg.update(extra_cfg or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    tok.chat_template = None
    tok.save_pretrained(folder)
    return lm, state


def _reference_logits(lm, state, clip_dir, pixel_values, input_ids, image_id, tower_state=None):
    """LLaVA's forward written out by hand: CLIP layer -2, drop CLS, mlp2x_gelu, splice, LLaMA."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(str(clip_dir), dtype=torch.float32).eval()
    if tower_state is not None:
        tower.load_state_dict(tower_state)
    with torch.no_grad():
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        h = torch.nn.functional.gelu(feats @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
        proj = h @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
        ids = input_ids.clone()
        mask = ids == image_id
        ids[mask] = 0
        emb = lm.get_input_embeddings()(ids)
        emb[mask] = proj.reshape(-1, proj.shape[-1])
        return lm(inputs_embeds=emb).logits


def _inputs(processor):
    img = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe the chest."}], tokenize=False, add_generation_prompt=True)
    return processor(images=[img], text=[text], return_tensors="pt", add_special_tokens=False), text


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_convert_with_tower_from_clip_folder_matches_manual_llava(tmp_path, fmt):
    clip_dir = tmp_path / "clip"
    _make_clip(clip_dir, seed=1)
    lm, state = _make_original_checkpoint(tmp_path / "ckpt", clip_dir, fmt=fmt)
    out = convert_llava_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    meta = json.loads((out / "fairllava_convert.json").read_text())
    assert meta["vision_tower_weights"] == "folder" and meta["added_tokens"] == ["<image>"]
    model, proc = load_vlm(out, dtype="float32")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    b, text = _inputs(proc)
    assert text.startswith("<s>A chat between") and text.endswith(" USER: <image>\nDescribe the chest. ASSISTANT:")
    img_id = image_token_id(model)
    assert img_id == len(proc.tokenizer) - 1  # appended after the LLaMA vocabulary
    assert int((b["input_ids"] == img_id).sum()) == 16
    with torch.no_grad():
        got = model(**b).logits
    ref = _reference_logits(lm, state, clip_dir, b["pixel_values"], b["input_ids"], img_id)
    old_vocab = ref.shape[-1]
    torch.testing.assert_close(got[..., :old_vocab], ref, rtol=1e-5, atol=1e-5)
    # the new <image> row is the mean embedding: never the argmax
    assert (got.argmax(-1) != img_id).all()


def test_tower_weights_in_checkpoint_take_precedence(tmp_path):
    from transformers import CLIPVisionModel

    clip_dir = tmp_path / "clip"
    _make_clip(clip_dir, seed=1)
    torch.manual_seed(9)
    other = CLIPVisionModel(CLIPVisionModel.config_class.from_pretrained(str(clip_dir))).state_dict()
    lm, state = _make_original_checkpoint(tmp_path / "ckpt", clip_dir, tower_in_ckpt=other)
    out = convert_llava_checkpoint(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")
    assert json.loads((out / "fairllava_convert.json").read_text())["vision_tower_weights"] == "checkpoint"
    model, proc = load_vlm(out, dtype="float32")  # the reference below is fp32
    b, _ = _inputs(proc)
    with torch.no_grad():
        got = model(**b).logits
    img_id = image_token_id(model)
    ref = _reference_logits(lm, state, clip_dir, b["pixel_values"], b["input_ids"], img_id, tower_state=other)
    torch.testing.assert_close(got[..., : ref.shape[-1]], ref, rtol=1e-5, atol=1e-5)
    ref_folder = _reference_logits(lm, state, clip_dir, b["pixel_values"], b["input_ids"], img_id)
    assert not torch.allclose(ref_folder, ref)  # the two towers really differ


def test_open_clip_and_bad_checkpoints_are_clear_errors(tmp_path):
    clip_dir = tmp_path / "clip"
    _make_clip(clip_dir, seed=1)
    _make_original_checkpoint(tmp_path / "rad", clip_dir,
                              extra_cfg={"mm_vision_tower": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"})
    with pytest.raises(FairllavaError, match="open_clip.*docs/models.md"):
        convert_llava_checkpoint(tmp_path / "rad", tmp_path / "o1")
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text("{}")
    with pytest.raises(FairllavaError, match="open_clip"):
        convert_llava_checkpoint(tmp_path / "rad", tmp_path / "o1", vision_tower=oc)
    _make_original_checkpoint(tmp_path / "lin", clip_dir, extra_cfg={"mm_projector_type": "linear"})
    with pytest.raises(FairllavaError, match="mlp2x_gelu"):
        convert_llava_checkpoint(tmp_path / "lin", tmp_path / "o2")
    _make_original_checkpoint(tmp_path / "miss", clip_dir, extra_cfg={"mm_vision_tower": str(tmp_path / "nope")})
    with pytest.raises(FairllavaError, match="not found locally.*--vision-tower"):
        convert_llava_checkpoint(tmp_path / "miss", tmp_path / "o3")
    with pytest.raises(FairllavaError, match="not an original-LLaVA"):
        convert_llava_checkpoint(clip_dir, tmp_path / "o4")
    assert not any(p.name.lstrip(".")[:2] in ("o1", "o2", "o3", "o4") for p in tmp_path.iterdir())  # nothing half-written


def test_cli_convert_llava(tmp_path):
    from typer.testing import CliRunner

    from fairllava.cli import app

    clip_dir = tmp_path / "clip"
    _make_clip(clip_dir, seed=1)
    _make_original_checkpoint(tmp_path / "ckpt", clip_dir)
    r = CliRunner().invoke(app, ["convert-llava", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert VICUNA_V1_TEMPLATE  # the template shipped for LLaMA/Vicuna tokenizers without one
