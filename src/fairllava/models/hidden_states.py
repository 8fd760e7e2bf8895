"""Capture chosen decoder hidden states with forward hooks, and build the image-token mask.

Why hooks: ``output_hidden_states=True`` returns every layer, keeping all L+1 [B, T, D] tensors alive for the
whole step; the regulariser needs one to three. Hooks keep exactly the requested tensors (with their autograd
graph) and work with gradient checkpointing: transformers 5 checkpoints each block's ``forward`` inside
``__call__``, so module hooks run once per forward and see the checkpointed output, never the backward replay.

Index convention = HF ``output_hidden_states`` (docs/DESIGN.md "Hidden states"): 0 = input of decoder block 0
(embeddings with image features spliced in), l in 1..L-1 = output of block l, L = output of the final norm.
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch
import torch.nn as nn

_LAYER_NAMES = ("layers", "h", "blocks")
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")
_EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings")


class DecoderParts(NamedTuple):
    decoder: nn.Module  # the module whose forward runs embeddings -> blocks -> final norm
    layers: nn.ModuleList
    norm: nn.Module


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT wrappers: PeftModel.get_base_model() returns the transformers model (with LoRA layers injected).
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    return model


def _parts_of(module: nn.Module) -> DecoderParts | None:
    layers = next((getattr(module, n) for n in _LAYER_NAMES if isinstance(getattr(module, n, None), nn.ModuleList)), None)
    norm = next((getattr(module, n) for n in _NORM_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    embed = next((getattr(module, n) for n in _EMBED_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    if layers is None or norm is None or embed is None or len(layers) == 0:
        return None
    return DecoderParts(module, layers, norm)


def decoder_layers(model: nn.Module) -> DecoderParts:
    """Find the language model's decoder (blocks ModuleList + final norm) in an HF causal LM / VLM / PEFT model.

    The LM decoder is the module owning token embeddings, a block list and a final norm (Llama, Qwen2, Mistral,
    LLaVA's ``language_model``, ...). Vision towers have no token embeddings, so they never match.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
    root = _unwrap(model)
    found = [(name, p) for name, m in root.named_modules() if (p := _parts_of(m)) is not None]
    if not found:
        raise ValueError(
            f"{type(root).__name__}: no language-model decoder found (expected a module with token embeddings, "
            f"a block ModuleList {list(_LAYER_NAMES)} and a final norm {list(_NORM_NAMES)})"
        )
    if len(found) > 1:
        lm = [f for f in found if "language_model" in f[0]]
        if len(lm) != 1:
            raise ValueError(f"{type(root).__name__}: several decoders found ({[f[0] or '<root>' for f in found]}); "
                             "cannot tell which one is the language model")
        found = lm
    return found[0][1]


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise TypeError(f"cannot find the hidden-state tensor in a {type(x).__name__} output")


class HiddenStateCapture:
    """Context manager: ``with HiddenStateCapture(model, [0, 15]) as cap: model(**batch)``; then ``cap.states``.

    ``states`` maps each requested index to a [B, T, D] tensor that keeps its autograd graph (so a loss on it
    back-propagates into LoRA / projector weights). Each new forward of the decoder replaces the states.
    Negative indices count from the end (-1 = final norm output).
    """

    def __init__(self, model: nn.Module, indices: int | Iterable[int]):
        self.parts = decoder_layers(model)
        self.num_hidden_states = len(self.parts.layers) + 1
        raw = [indices] if isinstance(indices, int) else list(indices)
        if not raw:
            raise ValueError("indices: at least one hidden-state index is required")
        n = self.num_hidden_states
        self.indices: list[int] = []
        for i in raw:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"hidden-state index {i!r} is past the model depth: expected 0..{n - 1} "
                                 f"(or -{n}..-1); the model has {n - 1} decoder blocks")
            if i % n not in self.indices:
                self.indices.append(i % n)
        self.states: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._recording = False

    # hooks -------------------------------------------------------------
    def _store(self, idx: int, tensor: torch.Tensor) -> None:
        if self._recording:
            self.states[idx] = tensor

    def _start(self, module, args, kwargs):
        self.states = {}
        self._recording = True

    def _stop(self, module, args, kwargs, output):
        self._recording = False

    def __enter__(self) -> "HiddenStateCapture":
        if self._handles:
            raise RuntimeError("HiddenStateCapture is already active")
        d, layers, norm = self.parts
        self._handles.append(d.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(d.register_forward_hook(self._stop, with_kwargs=True, always_call=True))
        last = self.num_hidden_states - 1
        for idx in self.indices:
            if idx == 0:
                def pre(module, args, kwargs, _i=idx):
                    self._store(_i, args[0] if args else kwargs["hidden_states"])
                self._handles.append(layers[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                target = norm if idx == last else layers[idx - 1]

                def post(module, args, output, _i=idx):
                    self._store(_i, _first_tensor(output))
                self._handles.append(target.register_forward_hook(post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._recording = False

    def get(self, indices: Iterable[int] | None = None) -> list[torch.Tensor]:
        """States in the order of ``indices`` (default: the requested order); KeyError names a missing index."""
        out = []
        for i in self.indices if indices is None else indices:
            i = i % self.num_hidden_states
            if i not in self.states:
                raise KeyError(f"hidden state {i} was not captured (captured: {sorted(self.states)}); "
                               "was the model run inside the context?")
            out.append(self.states[i])
        return out

    def clear(self) -> None:
        """Drop the captured tensors (and the graph they hold)."""
        self.states = {}


def image_token_id_of(model_or_config: Any) -> int:
    """``config.image_token_id`` (or ``image_token_index``) of a model, PEFT wrapper or config; ValueError if none."""
    if isinstance(model_or_config, int) and not isinstance(model_or_config, bool):
        return model_or_config
    cfg = getattr(model_or_config, "config", model_or_config)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(
        f"{type(model_or_config).__name__}: the config has no image_token_id / image_token_index, so image tokens "
        "cannot be located; this is not a LLaVA-style model (pass image_mask yourself or use mi_token_mode "
        "'text'/'all')"
    )


def image_token_mask(input_ids: torch.Tensor, model_or_config: Any) -> torch.Tensor:
    """Bool [B, T] mask ``input_ids == image_token_id`` (all False on text-only rows)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer [B, T] tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    return input_ids == image_token_id_of(model_or_config)
