"""Which token positions enter the MI estimate, and how they become the samples z (METHOD.md §6.2–6.3).

Why separate: selection (image / text / all, BOS/EOS dropping) and pooling (one random token, masked mean,
or every token as its own sample) are the main levers measured in BENCHMARK-NOTES.md, so they must be
cheap to switch and easy to test in isolation. Padding is never selected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_error(row: int, mode: str, what: str) -> ValueError:
    hint = ""
    if mode == "image":
        hint = " (a text-only row has no image tokens; use mi_token_mode 'text' or 'all' for such data)"
    return ValueError(f"token mask selects no token in batch row {row} (mi_token_mode={mode!r}, {what}){hint}")


def _check_mask(name: str, mask: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a [B, T] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    if shape is not None and tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} like attention_mask, got {list(mask.shape)}")
    if mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or integer 0/1 tensor, got dtype {mask.dtype}")
    return mask.bool()


def select_tokens(
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor | None,
    mode: str = "image",
    drop_bos_eos: bool = False,
) -> torch.Tensor:
    """Bool ``[B, T]`` mask of positions to pool over; raises if a row selects nothing.

    image: image tokens (and attention); text: attention ∧ ¬image; all: attention. ``drop_bos_eos`` removes the
    first and last attended position of each row (ignored in image mode); a row left empty falls back to its
    attention mask (METHOD.md §6.2).
    """
    attn = _check_mask("attention_mask", attention_mask)
    img = None if image_mask is None else _check_mask("image_mask", image_mask, tuple(attn.shape))
    if mode == "image":
        if img is None:
            raise ValueError("mi_token_mode='image' needs image_mask (input_ids == image_token_id)")
        sel = attn & img
    elif mode == "text":
        sel = attn & ~img if img is not None else attn.clone()
    elif mode == "all":
        sel = attn.clone()
    else:
        raise ValueError(f"mi_token_mode must be one of ['image', 'text', 'all'], got {mode!r}")
    if drop_bos_eos and mode != "image":
        t = attn.shape[1]
        pos = torch.arange(t, device=attn.device).expand_as(attn)
        first = torch.where(attn, pos, torch.full_like(pos, t)).min(dim=1).values
        last = torch.where(attn, pos, torch.full_like(pos, -1)).max(dim=1).values
        dropped = sel & (pos != first[:, None]) & (pos != last[:, None])
        empty = ~dropped.any(dim=1)
        sel = torch.where(empty[:, None], attn, dropped)
    empty = ~sel.any(dim=1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        what = "the row has no attended position" if not bool(attn[row].any()) else "after masking"
        raise _row_error(row, mode, what)
    return sel


def _random_scores(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform scores in [0, 1) on selected positions, -1 elsewhere (drawn on the generator's device)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(mask.shape, generator=generator, device=gen_device).to(mask.device)
    return torch.where(mask, u, torch.full_like(u, -1.0))


def pool_indices(
    token_mask: torch.Tensor,
    pooling: str,
    generator: torch.Generator | None = None,
    max_tokens_per_sample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) positions of the tokens that become samples, for ``random_token`` and ``token`` pooling."""
    mask = token_mask.bool()
    if pooling == "random_token":
        cols = _random_scores(mask, generator).argmax(dim=1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        return rows, cols
    if pooling == "token":
        if max_tokens_per_sample is not None and max_tokens_per_sample < mask.shape[1]:
            scores = _random_scores(mask, generator)
            top = scores.topk(max_tokens_per_sample, dim=1).indices
            keep = torch.zeros_like(mask).scatter_(1, top, True) & mask
        else:
            keep = mask
        rows, cols = keep.nonzero(as_tuple=True)
        return rows, cols
    raise ValueError(f"pool_indices: pooling must be 'random_token' or 'token', got {pooling!r}")


def pool(
    hidden_states: list[torch.Tensor],
    token_mask: torch.Tensor,
    pooling: str = "random_token",
    l2_normalize: bool = True,
    generator: torch.Generator | None = None,
    max_tokens_per_sample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool hidden states ``[B, T, D]`` (several layers are averaged position-wise) into ``(z [N, D], row [N])``.

    Pooling is linear, so we pool each layer at the same positions and average: identical to averaging the
    layers first, without materialising a mean [B, T, D] tensor.
    """
    if not hidden_states:
        raise ValueError("hidden_states: at least one [B, T, D] tensor is required")
    shape = tuple(hidden_states[0].shape)
    for i, h in enumerate(hidden_states):
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or not h.is_floating_point():
            raise ValueError(f"hidden_states[{i}] must be a float [B, T, D] tensor, got "
                             f"{getattr(h, 'shape', type(h).__name__)}")
        if tuple(h.shape) != shape:
            raise ValueError(f"hidden_states[{i}] has shape {list(h.shape)}, expected {list(shape)} like entry 0")
    mask = _check_mask("token_mask", token_mask, shape[:2]).to(hidden_states[0].device)
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"token_mask selects no token in batch row {int(empty.nonzero()[0, 0])}")
    # z is fp32 whatever the model's dtype (bf16 sums of hundreds of tokens lose ~3 digits); the gather of the
    # token modes casts only the selected rows.
    if pooling == "masked_mean":
        m = mask.to(torch.float32)[:, :, None]
        denom = m.sum(dim=1)
        z = sum((h.float() * m).sum(dim=1) / denom for h in hidden_states) / len(hidden_states)
        rows = torch.arange(shape[0], device=mask.device)
    else:
        rows, cols = pool_indices(mask, pooling, generator, max_tokens_per_sample)
        z = sum(h[rows, cols].float() for h in hidden_states) / len(hidden_states)
    if l2_normalize:
        z = F.normalize(z, dim=-1)
    return z, rows
