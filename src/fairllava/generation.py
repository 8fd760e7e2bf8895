"""Batched greedy generation into a resumable predictions JSONL (EVALUATION.md §3, DESIGN.md "Predictions").

Why this shape: evaluation of a 7B model on thousands of reports takes hours, so a kill must cost at
most the batch in flight and a re-run must continue where it stopped. Progress goes to
``<out>.partial`` — complete lines appended per batch with flush + fsync — and only a finished run
is renamed to ``<out>`` (rows in input order), so a predictions file that exists is always complete.

Decoding follows the reference: greedy (one beam), KV cache, left padding so every prompt ends at
the same position, stop at EOS, prompt stripped, surrounding whitespace stripped. Prompts are built
by the training collator (``VLMCollator(mode="generate")``), so generation sees exactly the chat
template the model was fine-tuned with.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .errors import FairllavaError

# Collator keys that are not model inputs.
_NON_MODEL_KEYS = {"image_mask", "attr_labels", "ids", "references", "weights", "labels"}


@dataclass
class GenerationSettings:
    """Decoding settings (paper: greedy, 256 new tokens)."""

    batch_size: int = 8
    max_new_tokens: int = 256
    max_length: int = 2048

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")


@dataclass
class GenerationResult:
    out_path: Path
    n_total: int
    n_generated: int
    n_resumed: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def partial_path(out_path: str | os.PathLike) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".partial")


def _read_done(path: Path, valid_ids: set[str]) -> dict[str, dict]:
    """Rows already written. A trailing partial line (kill mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            f.seek(keep)
            f.truncate()
            data = data[:keep]
            f.flush()
            os.fsync(f.fileno())
    done: dict[str, dict] = {}
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FairllavaError(f"{path}:{lineno}: invalid JSON ({e.msg}); delete the file or use --no-resume") from None
        rid = row.get("id") if isinstance(row, dict) else None
        if rid is None or "prediction" not in row:
            raise FairllavaError(f"{path}:{lineno}: not a prediction row; delete the file or use --no-resume")
        if rid not in valid_ids:
            raise FairllavaError(
                f"{path}:{lineno} (id={rid}): id is not in the input data; the file belongs to another run "
                "(use --no-resume or another --out)"
            )
        done[rid] = row
    return done


def _as_dataset(records: Any, image_root: str | os.PathLike | None, vocabs: Mapping | None):
    from .data.dataset import VLMDataset

    if isinstance(records, VLMDataset):
        return records
    return VLMDataset(records, image_root=image_root, vocabs=vocabs)


def _display_attributes(attrs: Mapping[str, Any] | None, vocabs: Mapping | None) -> dict[str, Any]:
    """Attribute values for the predictions file: canonical class names when a vocabulary is given."""
    attrs = dict(attrs or {})
    if not vocabs:
        return attrs
    out = dict(attrs)
    for name, vocab in vocabs.items():
        out[name] = vocab.normalize(attrs.get(name))
    return out


def _model_device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.no_grad()
def generate_batch(model, processor, batch: Mapping[str, Any], max_new_tokens: int = 256) -> tuple[list[str], int]:
    """Greedy-decode one collated (left-padded) batch -> (stripped texts, number of new tokens incl. EOS)."""
    from .models.loading import image_token_id, unwrap_model

    tok = getattr(processor, "tokenizer", processor)
    device = _model_device(model)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
              if k not in _NON_MODEL_KEYS}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(unwrap_model(model).dtype)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
    )
    try:
        gen_kwargs["suppress_tokens"] = [image_token_id(model)]  # never emit the image placeholder
    except FairllavaError:
        pass
    out = model.generate(**inputs, **gen_kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    texts, n_tokens = [], 0
    for row in new.tolist():
        cut = len(row)
        for j, t in enumerate(row):
            if t in eos_ids:
                cut = j + 1
                break
        n_tokens += cut
        texts.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return texts, n_tokens


def generate_predictions(
    model,
    processor,
    records: Any,
    out_path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    vocabs: Mapping | None = None,
    resume: bool = True,
    include_prompt: bool = True,
    max_length: int = 2048,
    progress: bool = True,
    system_prompt: str | None = None,
) -> GenerationResult:
    """Generate a prediction for every record and write ``out_path`` (JSONL, input order).

    ``records``: a JSONL path, a list of record dicts, or a :class:`VLMDataset`. With ``resume`` the
    ids already in ``<out>.partial`` (or in a previous ``out``) are skipped; without it both are
    replaced. ``vocabs`` (optional) canonicalise attribute values; otherwise they pass through.
    """
    from .data.collator import VLMCollator

    settings = GenerationSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length)
    out_path = Path(out_path)
    part = partial_path(out_path)
    ds = _as_dataset(records, image_root, vocabs)
    if len(ds) == 0:
        raise FairllavaError(f"{getattr(ds, 'source', 'records')}: no records to generate for")
    ids = [str(r["id"]) for r in ds.records]
    valid = set(ids)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    done: dict[str, dict] = {}
    if resume:
        if out_path.is_file() and not part.exists():
            # A finished file from an earlier run: its rows count as done (data may have grown).
            done = _read_done(out_path, valid)
            if done:
                _write_rows(part, [done[i] for i in ids if i in done], mode="w")
        done = _read_done(part, valid) if part.exists() else done
    else:
        part.unlink(missing_ok=True)

    todo = [i for i, rid in enumerate(ids) if rid not in done]
    collator = VLMCollator(processor, ds.vocabs, mode="generate", max_length=settings.max_length,
                           system_prompt=system_prompt)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    new_tokens = 0
    try:
        with _progress(progress, total=len(ids), completed=len(ids) - len(todo)) as advance:
            for start in range(0, len(todo), settings.batch_size):
                idx = todo[start:start + settings.batch_size]
                items = [ds[i] for i in idx]
                batch = collator(items)
                texts, n_tok = generate_batch(model, processor, batch, settings.max_new_tokens)
                new_tokens += n_tok
                rows = []
                for i, item, text, ref in zip(idx, items, texts, batch["references"]):
                    rec = ds.records[i]
                    row = {"id": str(rec["id"]), "prediction": text, "reference": ref,
                           "attributes": _display_attributes(rec.get("attributes"), ds.vocabs)}
                    if rec.get("group_id") is not None:  # patient/lesion cluster: evaluation resamples it
                        row["group_id"] = str(rec["group_id"])
                    if rec.get("label") is not None:
                        row["label"] = rec["label"]
                    if include_prompt:
                        row["prompt"] = rec["conversations"][0]["value"]
                    rows.append(row)
                _write_rows(part, rows, mode="a")
                for r in rows:
                    done[r["id"]] = r
                advance(len(idx))
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - t0
    _finalize(part, out_path, ids, done)
    return GenerationResult(out_path, len(ids), len(todo), len(ids) - len(todo), new_tokens, seconds)


def _write_rows(path: Path, rows: Sequence[dict], mode: str) -> None:
    """Append complete lines in one write, then flush + fsync (a kill loses at most this batch)."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, mode, encoding="utf-8") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _finalize(part: Path, out_path: Path, ids: list[str], done: dict[str, dict]) -> None:
    """Write the rows in input order to ``out_path`` atomically, then drop the partial file."""
    from .io import atomic_write_jsonl

    missing = [i for i in ids if i not in done]
    if missing:  # pragma: no cover - generate loop covers every id
        raise RuntimeError(f"generation incomplete: {len(missing)} ids missing")
    atomic_write_jsonl(out_path, (done[i] for i in ids))
    part.unlink(missing_ok=True)


class _progress:
    """A progress display (:mod:`fairllava.progress`: live bar on a terminal, plain lines otherwise) or a no-op;
    yields ``advance(n)``."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.enabled, self.total, self.completed = enabled, total, completed
        self._p = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from .progress import ProgressDisplay

        self._p = ProgressDisplay(transient=False)
        self._p.__enter__()
        task = self._p.add_task("generate", total=self.total, completed=self.completed)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False


def iter_predictions(path: str | os.PathLike) -> Iterable[dict]:
    """Read a predictions file with located errors (``file:line``)."""
    from .io import iter_jsonl

    return iter_jsonl(path, required=("id", "prediction", "reference", "attributes"))


__all__ = [
    "GenerationResult",
    "GenerationSettings",
    "generate_batch",
    "generate_predictions",
    "iter_predictions",
    "partial_path",
]
