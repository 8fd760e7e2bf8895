"""Adapters for model-based clinical metrics (CheXbert F1, RadGraph-F1 partial, GREEN).

Why adapters: these metrics need third-party packages and large user-provided weights, so they are
optional. Each adapter imports its package lazily and raises a one-line :class:`FairllavaError` naming
what to install/set when unavailable. Evaluation only depends on two small protocols, so tests (and
users with their own implementations) inject scorers directly:

- :class:`ReportLabeler` — ``label(texts) -> [N, 14]`` CheXpert-order labels (1, 0, -1, NaN=blank)
- :class:`SampleScorer` — ``score(predictions, references) -> [N]`` per-sample scores in 0..1
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import FairllavaError
from .base import MetricStats, mean_metric
from .chexpert_rules import CONDITIONS, label_f1_metrics


@runtime_checkable
class ReportLabeler(Protocol):
    name: str

    def label(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class SampleScorer(Protocol):
    name: str

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray: ...


def _require(module: str, pip_name: str, metric: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FairllavaError(f"{metric} needs the optional package {pip_name!r} (pip install {pip_name}); "
                             f"install it or drop {metric} from the metric list") from None


def _weights(path: str | os.PathLike | None, env: str, metric: str) -> str | None:
    path = path or os.environ.get(env)
    if path is None:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FairllavaError(f"{metric}: no weights given; pass a local path or set {env} (offline mode: hub downloads disabled)")
        return None
    if not os.path.exists(path):
        raise FairllavaError(f"{metric}: weights path {path} does not exist (argument or {env})")
    return str(path)


class CheXbertLabeler:
    """CheXbert labels via ``f1chexbert`` (``F1CheXbert.get_label(report, mode="rrg")``), from a local checkpoint
    (argument or ``FAIRLLAVA_CHEXBERT_WEIGHTS``) or the package's hub download when online."""

    name = "chexbert"

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu"):
        mod = _require("f1chexbert", "f1chexbert", "CheXbert F1")
        ckpt = _weights(weights, "FAIRLLAVA_CHEXBERT_WEIGHTS", "CheXbert F1")
        kwargs = {"device": device}
        if ckpt is not None:
            kwargs["chexbert_checkpoint"] = ckpt
        try:
            self._model = mod.F1CheXbert(**kwargs)
        except TypeError:
            raise FairllavaError("CheXbert F1: the installed f1chexbert does not accept a local checkpoint "
                                 "(chexbert_checkpoint=...); upgrade it or unset FAIRLLAVA_CHEXBERT_WEIGHTS") from None

    def label(self, texts: Sequence[str]) -> np.ndarray:
        # 14 conditions in CheXpert order; 1 = positive, anything else is binarised to negative downstream.
        rows = [np.asarray(self._model.get_label(t, mode="rrg"), dtype=np.float64) for t in texts]
        return np.stack(rows) if rows else np.zeros((0, len(CONDITIONS)))


class RadGraphScorer:
    """RadGraph-F1 with ``reward_level="partial"`` via the ``radgraph`` package; empty report -> 0.

    The package loads its weights from the Hugging Face cache: offline, pre-populate ``HF_HOME``.
    """

    name = "radgraph_f1"

    def __init__(self, model_type: str | None = None):
        mod = _require("radgraph", "radgraph", "RadGraph-F1")
        kwargs = {"reward_level": "partial"}
        if model_type:
            kwargs["model_type"] = model_type
        self._f1 = mod.F1RadGraph(**kwargs)

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        _, rewards, _, _ = self._f1(hyps=list(predictions), refs=list(references))
        out = np.asarray(rewards, dtype=np.float64)
        out[[not p.strip() for p in predictions]] = 0.0
        return out


class GreenScorer:
    """GREEN (matched findings / (matched + clinically significant errors)) via the ``green_score`` package."""

    name = "green"

    def __init__(self, weights: str | os.PathLike | None = None, output_dir: str = "."):
        mod = _require("green_score", "green-score", "GREEN")
        model = _weights(weights, "FAIRLLAVA_GREEN_WEIGHTS", "GREEN") or "StanfordAIMI/GREEN-radllama2-7b"
        self._green = mod.GREEN(model, output_dir=output_dir)

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        _, _, scores, _, _ = self._green(list(references), list(predictions))
        return np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)


def _pkg_version(obj) -> str:
    top = type(obj).__module__.split(".")[0]
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def clinical_metrics(predictions: Sequence[str], references: Sequence[str],
                     scorers: Sequence[ReportLabeler | SampleScorer] = ()) -> dict[str, MetricStats]:
    """Metrics from injected scorers: labelers give ``{name}_{micro,macro}_{14,5}``, scorers give ``{name}``."""
    out: dict[str, MetricStats] = {}
    for s in scorers:
        meta = {"package": type(s).__module__, "version": _pkg_version(s), "scale": "percent (x100)"}
        if isinstance(s, ReportLabeler) and hasattr(s, "label"):
            pred, ref = np.asarray(s.label(predictions), float), np.asarray(s.label(references), float)
            if pred.shape != (len(predictions), len(CONDITIONS)) or ref.shape != pred.shape:
                raise ValueError(f"{s.name}: label() must return [N, {len(CONDITIONS)}], got {pred.shape} / {ref.shape}")
            out.update(label_f1_metrics(pred, ref, f"{s.name}_f1", dict(meta, level="corpus")))
        elif isinstance(s, SampleScorer):
            scores = np.asarray(s.score(predictions, references), dtype=np.float64)
            if scores.shape != (len(predictions),):
                raise ValueError(f"{s.name}: score() must return [N], got {scores.shape}")
            out[s.name] = mean_metric(s.name, 100.0 * scores, dict(meta, level="per-sample mean"))
        else:
            raise TypeError(f"{s!r} is neither a ReportLabeler (label) nor a SampleScorer (score)")
    return out
