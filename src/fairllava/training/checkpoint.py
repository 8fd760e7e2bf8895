"""Checkpoint layout, atomic publication, pruning, the run's artefact files, and the check that a resume
continues the same computation (``check_same_config``).

Why: a kill must never leave a checkpoint that looks complete but is not, so every checkpoint is
built under ``checkpoints/.tmp-*`` and renamed to ``checkpoints/checkpoint-<step>`` only when
complete (a rename is atomic on one filesystem). Resume picks the highest complete step.

Artefacts (in each checkpoint and in the final run dir):
``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT ``save_pretrained``; the projector is
inside it through ``modules_to_save``), ``projector.safetensors`` (the projector alone, for stage 2
or other tools), ``heads.safetensors`` (DAC heads / discriminator), ``config.yaml``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..errors import FairllavaError

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
PROJECTOR_FILE = "projector.safetensors"
HEADS_FILE = "heads.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(step, path)]`` sorted by step (temp dirs are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    ck = list_checkpoints(run_dir)
    return ck[-1][1] if ck else None


def temp_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-checkpoint-{step}"
    return tmp


def publish_checkpoint(tmp: Path, step: int) -> Path:
    """Rename a finished temp checkpoint into place (replacing a stale one of the same step)."""
    final = tmp.parent / f"checkpoint-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    ck = list_checkpoints(run_dir)
    for _, p in ck[: max(0, len(ck) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():  # leftovers of killed saves
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def discard_checkpoints(run_dir: str | os.PathLike) -> None:
    """Rename complete checkpoints to ``.failed-checkpoint-*`` (kept, but no longer complete or resumable).

    For runs stopped by a configuration check (``fairness.on_dead_dac: error``): their checkpoints are valid
    states of a run that must not be continued or used as a result.
    """
    for _, p in list_checkpoints(run_dir):
        os.replace(p, p.parent / f".failed-{p.name}")


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: Optional[dict[str, Any]] = None) -> None:
    """safetensors with string metadata (JSON-encoded values)."""
    md = {k: json.dumps(v) for k, v in (meta or {}).items()}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=md)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FairllavaError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise FairllavaError(f"{path}: not a readable safetensors file ({e})") from None


def load_projector(projector: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a projector file (ours, or any safetensors whose keys end with the projector's keys)."""
    sd = load_tensors(path)
    own = projector.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for k in own:
        cands = [s for s in sd if s == k or s.endswith("." + k)]
        if len(cands) != 1:
            raise FairllavaError(
                f"{path}: cannot map projector weight {k!r} (found {len(cands)} candidates among {sorted(sd)[:6]}...)"
            )
        t = sd[cands[0]]
        if t.shape != own[k].shape:
            raise FairllavaError(f"{path}: projector weight {k!r} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
        mapped[k] = t
    projector.load_state_dict(mapped, strict=True)


# Keys that may change between a run and its resume without changing what is computed.
RESUME_FREE = {"logging", "checkpointing", "output_dir", "data.num_workers"}


def check_same_config(cfg, saved: Path) -> None:
    """A resume must continue the same computation: refuse a changed config (other than logging/paths)."""
    from .config import load_config

    old = load_config(saved).to_dict()
    raw = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    if isinstance(raw.get("lora"), dict) and "fp32_sum" not in raw["lora"]:
        old["lora"]["fp32_sum"] = "none"  # saved before the setting existed: its runs summed in the compute dtype
    new = cfg.to_dict()
    diffs = []

    def walk(a: Any, b: Any, path: str) -> None:
        if path in RESUME_FREE:
            return
        if isinstance(a, dict) and isinstance(b, dict) and path not in ("data.attributes", "fairness"):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(path)

    walk(old, new, "")
    if diffs:
        raise FairllavaError(
            f"--resume: the config differs from the checkpoint's ({saved}) at {', '.join(diffs)}; "
            "resume with the same settings or start a new --output-dir"
        )
