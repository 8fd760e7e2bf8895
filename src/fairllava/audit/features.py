"""Streaming extraction of pooled hidden states, with a resumable on-disk cache.

Why streaming: an audit of every layer of a 7B model over thousands of samples cannot keep hidden
states around. Each requested layer is pooled *inside the forward hook* (so at most one layer's
[B, T, D] activation is alive at a time, and only [B, D] per layer is kept), and every batch is written
as its own atomically renamed ``.npz`` shard: a kill loses at most the batch in flight, and a rerun
skips the shards that are already there.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FairllavaError
from ..io import atomic_path, atomic_write_json, stable_hash

TOKEN_MODES = ("image", "text", "all")
POOLINGS = ("masked_mean", "random_token")
#: Batch keys the model's forward takes (everything else in a collator batch is bookkeeping).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_attention_mask",
                    "image_grid_thw")
CACHE_VERSION = 1


@dataclass
class FeatureConfig:
    """Which hidden states to pool and how (same options as the regulariser, METHOD.md §6)."""

    layers: str | list[int] = "all"  # "all" or hidden-state indices (HF output_hidden_states convention)
    tokens: str = "image"  # image | text | all  (text = prompt tokens; see include_answer)
    pooling: str = "masked_mean"  # masked_mean | random_token
    batch_size: int = 8
    seed: int = 0
    max_length: int = 2048
    include_answer: bool = False  # False: prompt only, as at inference; True: teacher-forced answer too
    system_prompt: str | None = None  # chat-template system turn (None = template default); use the training one

    def validate(self) -> None:
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens={self.tokens!r}: expected one of {', '.join(TOKEN_MODES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: expected >= 1")
        if self.layers != "all" and (not isinstance(self.layers, (list, tuple)) or not self.layers
                                     or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)):
            raise ValueError(f"layers={self.layers!r}: expected 'all' or a non-empty list of integers")


def parse_layers(text: str) -> str | list[int]:
    """CLI ``--layers all|0,5,10`` -> ``"all"`` or a list of ints."""
    text = text.strip()
    if text == "all":
        return "all"
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FairllavaError(f"--layers {text!r}: expected 'all' or comma-separated integers like 0,5,10") from None
    if not out:
        raise FairllavaError(f"--layers {text!r}: expected 'all' or comma-separated integers like 0,5,10")
    return out


@dataclass
class FeatureSet:
    """Pooled features of one model: ``X[layer]`` is ``[N, D]`` float32, rows aligned with ``ids``."""

    ids: list[str]
    layers: list[int]
    X: dict[int, np.ndarray]
    info: dict = field(default_factory=dict)


def _pooling_capture(model, indices: Sequence[int], pool_fn):
    """A :class:`fairllava.models.hidden_states.HiddenStateCapture` that pools each state as its hook fires.

    Same index convention and decoder discovery; only where a captured tensor goes changes: instead of
    keeping ``[B, T, D]`` it stores the pooled ``[B, D]`` (float32, CPU).
    """
    from ..models.hidden_states import HiddenStateCapture

    class PoolingCapture(HiddenStateCapture):
        def _store(self, idx, tensor):
            if self._recording:
                self.states[idx] = pool_fn(tensor)

    return PoolingCapture(model, list(indices))


def progress_bar(enabled: bool):
    """The shared progress display (:mod:`fairllava.progress`; disabled in library/test use)."""
    from ..progress import progress_display

    return progress_display(enabled=enabled, transient=True)


def resolve_layers(model, layers: str | Sequence[int]) -> list[int]:
    """Requested indices -> sorted non-negative hidden-state indices; ValueError past the depth."""
    from ..models.hidden_states import decoder_layers

    n = len(decoder_layers(model).layers) + 1
    if layers == "all":
        return list(range(n))
    out = []
    for i in layers:
        if not -n <= int(i) < n:
            raise ValueError(f"layer {i}: past the model depth (hidden-state indices 0..{n - 1})")
        out.append(int(i) % n)
    return sorted(set(out))


def _token_mask(batch: dict, tokens: str, model) -> torch.Tensor:
    from ..regularizer.pooling import select_tokens

    attn = batch["attention_mask"].bool()
    image_mask = batch.get("image_mask")
    if image_mask is None and tokens != "all":
        from ..models.hidden_states import image_token_mask

        image_mask = image_token_mask(batch["input_ids"], model)
    return select_tokens(attn, image_mask, mode=tokens)


def _model_name_hash(model) -> str:
    """A fingerprint so a cache is never reused for a different model: class, config and every weight tensor's
    sum (adapters included — two LoRA adapters on one base must not share a cache)."""
    from ..models.loading import unwrap_model

    base = unwrap_model(model)
    h = [type(model).__name__, type(base).__name__]
    cfg = getattr(base, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.append(cfg.to_json_string(use_diff=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.append(f"{name}:{float(p.detach().float().sum()):.6e}")
    return f"{stable_hash(*h):016x}"


def extract_features(model, processor, records: Sequence[dict], image_root: str | os.PathLike | None,
                     cache_dir: str | os.PathLike, cfg: FeatureConfig | None = None, *, vocabs=None,
                     progress: bool = True, label: str = "model", max_batches: int | None = None) -> FeatureSet:
    """Pool hidden states of ``model`` on ``records`` batch by batch into ``cache_dir`` (resumable).

    ``max_batches`` stops after that many *new* batches (used to test resumption; None = all).
    """
    from ..data.collator import VLMCollator
    from ..data.dataset import VLMDataset
    from ..regularizer.pooling import pool, pool_indices

    cfg = cfg or FeatureConfig()
    cfg.validate()
    layers = resolve_layers(model, cfg.layers)
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise FairllavaError("audit data: duplicate sample ids")
    cache_dir = Path(cache_dir)
    key = {
        "version": CACHE_VERSION,
        "model": _model_name_hash(model),
        "config": {**asdict(cfg), "layers": layers},
        "ids": f"{stable_hash(*ids):016x}",
        "n": len(ids),
    }
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old != key:
            raise FairllavaError(
                f"{cache_dir}: feature cache was made for another model/config/data; use a new --out or delete it")
    else:
        atomic_write_json(meta_path, key)

    dataset = VLMDataset(list(records), image_root, vocabs=vocabs or {})
    collator = VLMCollator(processor, vocabs=vocabs or {}, mode="train" if cfg.include_answer else "generate",
                           max_length=cfg.max_length, system_prompt=cfg.system_prompt)
    n_batches = (len(ids) + cfg.batch_size - 1) // cfg.batch_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new = 0

    try:
        with progress_bar(progress) as bar:
            job = bar.add_task(f"pooling {label}", total=n_batches)
            for b in range(n_batches):
                shard = cache_dir / f"shard_{b:05d}.npz"
                lo, hi = b * cfg.batch_size, min(len(ids), (b + 1) * cfg.batch_size)
                if _shard_ok(shard, ids[lo:hi], layers):
                    bar.advance(job)
                    continue
                if max_batches is not None and new >= max_batches:
                    break
                batch = collator([dataset[i] for i in range(lo, hi)])
                mask = _token_mask(batch, cfg.tokens, model).to(device)
                if cfg.pooling == "random_token":
                    gen = torch.Generator().manual_seed(stable_hash(cfg.seed, "audit-token", b) % (2**63))
                    rows, cols = pool_indices(mask.cpu(), "random_token", generator=gen)

                    def pool_fn(h, rows=rows, cols=cols):
                        return h[rows.to(h.device), cols.to(h.device)].detach().float().cpu()
                else:
                    def pool_fn(h, mask=mask):
                        z, _ = pool([h.detach()], mask.to(h.device), pooling="masked_mean", l2_normalize=False)
                        return z.float().cpu()
                inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS and v is not None}
                with torch.no_grad(), _pooling_capture(model, layers, pool_fn) as cap:
                    model(**inputs, use_cache=False)
                    states = {i: cap.states[i] for i in layers}
                arr = np.stack([states[i].numpy().astype(np.float32) for i in layers])  # [L, B, D]
                with atomic_path(shard) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, ids=np.array(ids[lo:hi]), layers=np.array(layers), X=arr)
                new += 1
                bar.advance(job)
    finally:
        model.train(was_training)
    return load_features(cache_dir, ids, layers, require_complete=max_batches is None)


def _shard_ok(path: Path, ids: Sequence[str], layers: Sequence[int]) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return list(z["ids"].tolist()) == list(ids) and list(z["layers"].tolist()) == list(layers)
    except Exception:  # a corrupt shard (should not happen with atomic writes) is recomputed
        return False


def load_features(cache_dir: str | os.PathLike, ids: Sequence[str], layers: Sequence[int],
                  require_complete: bool = True) -> FeatureSet:
    """Assemble the cached shards (in order) into a :class:`FeatureSet`."""
    cache_dir = Path(cache_dir)
    shards = sorted(cache_dir.glob("shard_*.npz"))
    got_ids: list[str] = []
    parts: list[np.ndarray] = []
    for p in shards:
        with np.load(p) as z:
            got_ids += z["ids"].tolist()
            parts.append(z["X"])
    if require_complete and got_ids != list(ids):
        raise FairllavaError(f"{cache_dir}: feature cache incomplete ({len(got_ids)}/{len(ids)} samples)")
    if parts:
        X = np.concatenate(parts, axis=1)
    else:
        X = np.zeros((len(layers), 0, 0), dtype=np.float32)
    return FeatureSet(ids=got_ids, layers=list(layers), X={l: X[k] for k, l in enumerate(layers)},
                      info={"cache": str(cache_dir), "n_shards": len(shards)})
