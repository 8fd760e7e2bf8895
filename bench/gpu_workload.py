"""Model and workload sizes of the device check (bench/gpu_check.py), shared by its phases.

Split out so gpu_check.py holds the phases only: ``Spec`` (PAPER = the LLaVA-1.5-7B architecture, TINY = the CPU/CI
config), the model built from a ``Spec``, the synthetic training records, the ideal FLOPs of one training step and
the per-step memory meter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Spec:
    """Model + workload sizes. PAPER = LLaVA-1.5-7B: CLIP ViT-L/14-336 -> 2-layer GELU MLP -> Llama-2-7B/Vicuna."""

    name: str
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    image_size: int = 336
    patch_size: int = 14          # 336/14 = 24 -> 576 image tokens (CLS dropped: "default" strategy)
    text_hidden: int = 4096
    text_layers: int = 32
    text_heads: int = 32
    text_kv_heads: int = 32
    text_intermediate: int = 11008
    vocab_size: int = 32064       # LLaVA-1.5 HF vocabulary (the tiny BPE's ids are a subset)
    batch: int = 16
    steps: int = 4                # timed rounds (one warm-up round more)
    report_words: int = 45        # x ~2.2 tiny-BPE tokens per word = a ~100-token target report
    gen_prompts: int = 64
    gen_bs1_prompts: int = 4      # batch-1 decoding on a subset (budget)
    gen_batch: int = 16
    gen_new_tokens: int = 100
    budgets: tuple = (("install", 50), ("versions", 20), ("build", 60), ("train", 120), ("generate", 80),
                      ("tests", 60), ("fsdp", 90))


PAPER = Spec("llava-1.5-7b-arch")
TINY = Spec("tiny", vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, image_size=32,
            patch_size=8, text_hidden=64, text_layers=4, text_heads=4, text_kv_heads=4, text_intermediate=128,
            vocab_size=0, batch=8, steps=2, report_words=14, gen_prompts=16, gen_bs1_prompts=2, gen_batch=16,
            gen_new_tokens=16,
            budgets=(("install", 50), ("versions", 30), ("build", 30), ("train", 60), ("generate", 40), ("tests", 150),
                     ("fsdp", 150)))


def build_model(spec: Spec, device, dtype):
    """``(model, processor)``: LlavaForConditionalGeneration from configs, random weights, built on ``device``."""
    import torch
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

    from fairllava.models.tiny import IMAGE_TOKEN, build_tiny_processor

    processor = build_tiny_processor(image_size=spec.image_size, patch_size=spec.patch_size)
    tok = processor.tokenizer
    vocab = spec.vocab_size or len(tok)
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=vocab, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(spec.image_size // spec.patch_size) ** 2, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    with torch.device(device):  # weights are created (and randomly initialised) on the GPU itself
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.to(device)  # no-op unless some buffer was made on the CPU explicitly
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gc.do_sample, gc.num_beams = False, 1
    return model, processor


def write_records(folder: Path, n: int, spec: Spec) -> tuple[Path, Path]:
    """``n`` mimic-preset records: random images, ~report_words-word reports, every attribute class present."""
    import numpy as np
    from PIL import Image

    from fairllava.data.attributes import AGE_GROUP_CLASSES, RACE8_CLASSES, SEX_CLASSES
    from fairllava.models.tiny import _WORDS

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    rows = []
    for i in range(n):
        pixels = (rng.rand(spec.image_size, spec.image_size, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(images / f"{i}.png")
        words = [_WORDS[j] for j in rng.randint(0, len(_WORDS), spec.report_words)]
        talk = [{"from": "human", "value": "<image>\nDescribe the findings of this chest X-ray."},
                {"from": "gpt", "value": " ".join(words) + "."}]
        rows.append({"id": f"s{i}", "group_id": f"p{i}", "image": f"{i}.png", "conversations": talk,
                     "attributes": {"race": RACE8_CLASSES[i % 7], "age_group": AGE_GROUP_CLASSES[i % 3],
                                    "sex": SEX_CLASSES[i % 2]}})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, images


def ideal_step_flops(spec: Spec, n_tokens: int, seq: int, n_keep: int, batch: int) -> float:
    """Dense FLOPs of one LoRA stage-2 step: LM 3 forwards (forward, GC recompute, input-grad backward), vision once."""
    d, ff, L, h = spec.text_hidden, spec.text_intermediate, spec.text_layers, spec.text_heads
    kv = d * spec.text_kv_heads // h
    lm_params = L * (2 * d * d + 2 * d * kv + 3 * d * ff)
    lm = 2 * lm_params * n_tokens + 4 * seq * d * L * n_tokens / 2 + 2 * d * (spec.vocab_size or 1) * n_keep * batch
    dv, p = spec.vision_hidden, (spec.image_size // spec.patch_size) ** 2 + 1
    vit = batch * (2 * spec.vision_layers * (4 * dv * dv + 2 * dv * spec.vision_intermediate) * p
                   + 4 * p * p * dv * spec.vision_layers)
    return 3 * lm + vit


class MemMeter:
    """Peak memory of one step. CUDA: the allocator's peak. CPU (--tiny): parameters + gradients + optimizer state +
    tensors saved for backward (an estimate: the CPU allocator keeps no peak)."""

    def __init__(self, device, params, optimizer) -> None:
        self.device, self.params, self.opt, self.saved, self._hooks = device, params, optimizer, {}, None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            def pack(t):
                self.saved[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
                return t

            self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def stop_saving(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def __exit__(self, *exc) -> None:
        self.stop_saving()  # also when the step raised: later phases must not inherit the hooks

    def peak_gb(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1e9
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        b = sum(size(p) + (size(p.grad) if p.grad is not None else 0) for p in self.params)
        b += sum(size(v) for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v))
        return (b + sum(self.saved.values())) / 1e9
