"""Convert original-LLaVA-format checkpoints (LLaVA-1.5 / LLaVA-Rad style) into HF ``LlavaForConditionalGeneration``.

Why: many medical LLaVA checkpoints (LLaVA-Rad, LLaVA-Med v1.5 style) ship in the original
``haotian-liu/LLaVA`` layout — LLaMA weights plus ``model.mm_projector.{0,2}.*`` and a config that
only *references* the vision tower (``mm_vision_tower``). fairllava works on HF models through the
Auto classes, so we map those checkpoints once into an HF folder.

Mapping (LLaVA ``mlp2x_gelu`` == HF ``LlavaMultiModalProjector``):
  ``model.<llama>``            -> ``model.language_model.<llama>``
  ``lm_head.weight``           -> ``lm_head.weight``
  ``model.mm_projector.0.*``   -> ``model.multi_modal_projector.linear_1.*``
  ``model.mm_projector.2.*``   -> ``model.multi_modal_projector.linear_2.*``
  tower: ``model.vision_tower.vision_tower.*`` in the checkpoint if present, else the referenced CLIP folder.
``mm_vision_select_layer`` -> ``vision_feature_layer``; ``mm_vision_select_feature`` "patch" -> strategy
"default" (CLS dropped), "cls_patch" -> "full". An ``<image>`` token is added to the tokenizer (the original
code used the out-of-vocabulary id -200). Only CLIP towers map onto HF LLaVA; open_clip towers
(BiomedCLIP, LLaVA-Rad's BiomedCLIP-CXR) raise a FairllavaError explaining the route (docs/models.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import FairllavaError

IMAGE_TOKEN = "<image>"

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA's "vicuna_v1" conversation: "<sys> USER: <q> ASSISTANT: <a></s>USER: ..." ; generation prompt "ASSISTANT:".
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{{ messages[0]['content'] }}"
    "{% else %}{% for p in messages[0]['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% else %}{{ '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ ' ' + ('USER' if message['role'] == 'user' else 'ASSISTANT') + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for p in message['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<image>\n' }}{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

_OPEN_CLIP_MARKERS = ("biomedclip", "open_clip", "open-clip", "hf-hub:", "biomed_clip")
_TOWER_PREFIXES = ("model.vision_tower.vision_tower.", "model.vision_tower.")
_LLAVA_ONLY_KEYS = ("mm_", "tune_mm", "freeze_mm", "image_aspect_ratio", "image_grid_pinpoints", "unfreeze_mm",
                    "use_mm_proj", "mm_patch_merge_type", "tokenizer_model_max_length", "tokenizer_padding_side")

_OPEN_CLIP_ROUTE = (
    "it is an open_clip model (e.g. BiomedCLIP / LLaVA-Rad's BiomedCLIP-CXR), which HF LlavaForConditionalGeneration "
    "cannot host. Route: export the tower's ViT to a HF CLIPVisionModel folder yourself (re-map open_clip's "
    "'visual.trunk.*' timm ViT weights to CLIP names, checking numerical parity) and pass it with --vision-tower, "
    "or train with fairllava's embedded/HF models instead; see docs/models.md"
)


def _read_config(src: Path) -> dict:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FairllavaError(f"{src}: no config.json; not an original-LLaVA checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FairllavaError(f"{cfg_path}: invalid JSON ({e.msg})") from None
    if "mm_vision_tower" not in cfg and "mm_projector_type" not in cfg:
        raise FairllavaError(
            f"{cfg_path}: no mm_vision_tower/mm_projector_type; this is not an original-LLaVA-format checkpoint "
            "(HF LLaVA folders load directly with load_vlm)"
        )
    return cfg


def _load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: safetensors (preferred) or ``.bin`` via ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    st = sorted(src.glob("*.safetensors"))
    bins = sorted(p for p in src.glob("*.bin") if p.name not in ("training_args.bin",))
    state: dict[str, torch.Tensor] = {}
    if st:
        for p in st:
            state.update(load_file(str(p)))
    elif bins:
        for p in bins:
            try:
                part = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises several types for bad pickles
                raise FairllavaError(f"{p}: cannot load weights safely ({type(e).__name__}: {e})") from None
            state.update(part)
    else:
        raise FairllavaError(f"{src}: no *.safetensors or *.bin weight files")
    return state


def _tower_source(cfg: dict, vision_tower: str | os.PathLike | None, src: Path) -> str:
    name = str(vision_tower) if vision_tower is not None else str(cfg.get("mm_vision_tower") or "")
    if not name:
        raise FairllavaError(f"{src}/config.json: mm_vision_tower is empty; pass --vision-tower DIR (a HF CLIP folder)")
    p = Path(name).expanduser()
    if not p.is_absolute() and not p.exists() and (src / name).exists():
        p = src / name
    if p.exists():
        if (p / "open_clip_config.json").is_file():
            raise FairllavaError(f"vision tower {p}: {_OPEN_CLIP_ROUTE}")
        if not (p / "config.json").is_file():
            raise FairllavaError(f"vision tower {p}: no config.json; expected a HF CLIP model folder")
        return str(p)
    if name.lower().startswith("hf-hub:") or any(m in Path(name).name.lower() for m in _OPEN_CLIP_MARKERS):
        raise FairllavaError(f"vision tower {name!r}: {_OPEN_CLIP_ROUTE}")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or name.startswith((".", "/", "~")):
        raise FairllavaError(
            f"vision tower {name!r} not found locally; pass --vision-tower DIR pointing to a HF CLIP folder"
        )
    return name  # hub id (online use only)


def _vision_config(tower: str):
    from transformers import AutoConfig, CLIPVisionConfig

    try:
        raw = AutoConfig.from_pretrained(tower)
    except (OSError, ValueError) as e:
        raise FairllavaError(f"vision tower {tower!r}: cannot read its config ({str(e).splitlines()[0]})") from None
    if raw.model_type == "clip":
        return raw.vision_config
    if raw.model_type == "clip_vision_model":
        return raw
    if isinstance(raw, CLIPVisionConfig):  # pragma: no cover
        return raw
    raise FairllavaError(
        f"vision tower {tower!r}: model_type {raw.model_type!r} is not a CLIP model; only CLIP towers map onto HF "
        "LLaVA (see docs/models.md)"
    )


def _text_config(cfg: dict, vocab_size: int):
    from transformers import LlamaConfig

    mt = str(cfg.get("model_type", "")).lower()
    arch = " ".join(cfg.get("architectures") or []).lower()
    if any(k in mt + arch for k in ("mistral", "mpt", "qwen", "gemma", "phi")):
        raise FairllavaError(
            f"language model {cfg.get('architectures') or mt}: only LLaMA/Vicuna-based original checkpoints "
            "are converted (LLaVA-1.5, LLaVA-Rad); load newer families as HF models"
        )
    text = {k: v for k, v in cfg.items()
            if not k.startswith(_LLAVA_ONLY_KEYS) and k not in ("architectures", "model_type", "_name_or_path",
                                                                 "transformers_version", "torch_dtype", "dtype",
                                                                 "auto_map", "use_cache")}
    text["vocab_size"] = vocab_size
    return LlamaConfig(**text)


def _split_state(state: dict[str, torch.Tensor]):
    lm, proj, tower = {}, {}, {}
    for k, v in state.items():
        if k.startswith("model.mm_projector."):
            proj[k[len("model.mm_projector."):]] = v
        elif k.startswith("model.vision_tower."):
            for pre in _TOWER_PREFIXES:
                if k.startswith(pre):
                    tower[k[len(pre):]] = v
                    break
        elif k.startswith("model."):
            lm["model.language_model." + k[len("model."):]] = v
        elif k == "lm_head.weight":
            lm[k] = v
        else:
            raise FairllavaError(f"unexpected weight {k!r} in the checkpoint (not LLaMA, mm_projector or vision tower)")
    return lm, proj, tower


def _tower_state(tower_state: dict[str, torch.Tensor], tower: str) -> tuple[dict[str, torch.Tensor], str]:
    """HF CLIPVisionModel weights: from the checkpoint when present, else from the referenced CLIP folder."""
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        want = set(CLIPVisionModel(_vision_config(tower)).state_dict())
    if tower_state:
        fixed = {}
        for k, v in tower_state.items():
            k2 = k[len("vision_model."):] if k.startswith("vision_model.") and k not in want else k
            fixed[k2] = v
        fixed.pop("embeddings.position_ids", None)
        missing, unexpected = want - set(fixed), set(fixed) - want
        if missing or unexpected:
            raise FairllavaError(
                "vision-tower weights in the checkpoint do not match a CLIP vision model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        return fixed, "checkpoint"
    clip = CLIPVisionModel.from_pretrained(tower, dtype=torch.float32)
    return {k: v for k, v in clip.state_dict().items() if k in want}, "folder"


def _save_and_verify(folder: Path, config, state: dict[str, torch.Tensor], tok, image_id: int) -> None:
    """Write config + safetensors + generation config, then reload with HF and require an exact key match."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    gc = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          do_sample=False, num_beams=1, suppress_tokens=[image_id])
    gc.save_pretrained(folder)
    _, info = LlavaForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True, dtype="auto")
    bad = [k for k in info.get("missing_keys", []) if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    bad += list(info.get("unexpected_keys", [])) + list(info.get("mismatched_keys", []))
    if bad:
        raise FairllavaError(f"converted weights do not load as HF LLaVA: {sorted(map(str, bad))[:5]}")


def _projector_state(proj: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype != "mlp2x_gelu":
        raise FairllavaError(
            f"mm_projector_type={ptype!r}: HF LLaVA has a 2-layer GELU projector; only 'mlp2x_gelu' converts exactly"
        )
    need = {"0.weight", "0.bias", "2.weight", "2.bias"}
    if set(proj) != need:
        raise FairllavaError(f"mm_projector weights {sorted(proj)}: expected {sorted(need)} (mlp2x_gelu)")
    return {
        "model.multi_modal_projector.linear_1.weight": proj["0.weight"],
        "model.multi_modal_projector.linear_1.bias": proj["0.bias"],
        "model.multi_modal_projector.linear_2.weight": proj["2.weight"],
        "model.multi_modal_projector.linear_2.bias": proj["2.bias"],
    }


def convert_llava_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Convert ``src`` (original LLaVA layout) into an HF LLaVA model + processor folder at ``out_dir``."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        LlavaConfig,
        LlavaProcessor,
    )

    from ..io import atomic_dir

    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise FairllavaError(f"{src}: checkpoint folder not found")
    if out_dir.exists() and not overwrite:
        raise FairllavaError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    cfg = _read_config(src)
    if cfg.get("mm_use_im_start_end"):
        raise FairllavaError(f"{src}/config.json: mm_use_im_start_end=true is not supported by HF LLaVA")
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise FairllavaError(f"{src}/config.json: mm_vision_select_feature={select!r}; expected patch or cls_patch")
    tower = _tower_source(cfg, vision_tower, src)
    vcfg = _vision_config(tower)

    state = _load_state_dict(src)
    lm_state, proj, tower_state = _split_state(state)
    proj_state = _projector_state(proj, cfg)
    src_dtype = next(iter(lm_state.values())).dtype

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise FairllavaError(f"{src}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    added = {}
    if IMAGE_TOKEN not in tok.get_vocab():
        added["additional_special_tokens"] = [IMAGE_TOKEN]
    if tok.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tok.add_special_tokens(added, replace_extra_special_tokens=False)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = VICUNA_V1_TEMPLATE

    old_vocab = lm_state["model.language_model.embed_tokens.weight"].shape[0]
    text_cfg = _text_config(cfg, old_vocab)
    strategy = "default" if select == "patch" else "full"
    n_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + (0 if strategy == "default" else 1)
    config = LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_index=image_id,
        image_seq_length=n_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    if "lm_head.weight" not in lm_state and not config.tie_word_embeddings:
        raise FairllavaError(f"{src}: checkpoint has no lm_head.weight")
    tower_sd, tower_from = _tower_state(tower_state, tower)
    hf_state = {**lm_state, **proj_state, **{"model.vision_tower." + k: v for k, v in tower_sd.items()}}
    if config.tie_word_embeddings:
        hf_state.pop("lm_head.weight", None)
    if len(tok) > old_vocab:  # new rows (<image>, <pad>) = mean embedding: deterministic, never preferred
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in hf_state:
                w = hf_state[key]
                extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(len(tok) - old_vocab, -1)
                hf_state[key] = torch.cat([w, extra], 0)
        config.text_config.vocab_size = len(tok)
    target_dtype = {"auto": src_dtype, "float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}.get(dtype)
    if target_dtype is None:
        raise ValueError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
    hf_state = {k: v.to(target_dtype).contiguous() if v.is_floating_point() else v.contiguous()
                for k, v in hf_state.items()}
    config.dtype = str(target_dtype).replace("torch.", "")

    try:
        image_processor = AutoImageProcessor.from_pretrained(tower)
    except (OSError, ValueError):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": vcfg.image_size}, crop_size={"height": vcfg.image_size, "width": vcfg.image_size}
        )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=vcfg.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
        chat_template=tok.chat_template, image_token=IMAGE_TOKEN,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _save_and_verify(tmp, config, hf_state, tok, image_id)
        processor.save_pretrained(tmp)
        (tmp / "fairllava_convert.json").write_text(json.dumps({
            "source": str(src), "vision_tower": str(tower), "vision_tower_weights": tower_from,
            "added_tokens": sorted(set(added.get("additional_special_tokens", [])) | ({added["pad_token"]} if "pad_token" in added else set())),
            "note": "original LLaVA pads images to square (image_aspect_ratio=pad); the HF processor resizes and "
                    "center-crops instead",
        }, indent=2) + "\n", encoding="utf-8")
    return out_dir


def describe_checkpoint(src: str | os.PathLike) -> dict[str, Any]:
    """What the converter would see: LLaVA-specific config entries and weight groups (for error reports)."""
    src = Path(src)
    cfg = _read_config(src)
    lm, proj, tower = _split_state(_load_state_dict(src))
    return {"mm_config": {k: v for k, v in cfg.items() if k.startswith("mm_")}, "n_lm": len(lm),
            "projector": sorted(proj), "n_tower_in_checkpoint": len(tower)}


__all__ = ["VICUNA_V1_TEMPLATE", "convert_llava_checkpoint", "describe_checkpoint"]
