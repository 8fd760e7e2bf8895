"""Training metrics: ``metrics.jsonl`` in the run dir, optional TensorBoard, a progress display.

Why three sinks: the JSON-lines file is the record of a run (analysis, tests, resume bookkeeping);
TensorBoard is for watching curves; the progress bar is for the person at the terminal. Only the
main process writes. Logged values are scalar losses, diagnostics and counts — never text.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..io import atomic_write_jsonl

METRICS_FILE = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Append-only JSONL metrics (one object per logged step) + optional TensorBoard scalars."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint we resume from (they will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a kill
                    continue
                if int(row.get("step", 0)) <= step:
                    rows.append(row)
        atomic_write_jsonl(self.path, rows)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Progress over optimizer steps showing the latest losses (:mod:`fairllava.progress`; no-op when disabled)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "train") -> None:
        self._p = None
        if not enabled:
            return
        from ..progress import ProgressDisplay

        self._p = ProgressDisplay(transient=False)  # a live bar on a terminal, plain lines every ~30 s otherwise
        self._task = self._p.add_task(description, total=total, completed=start, info="")
        self._p.start()

    def update(self, step: int, values: Optional[Mapping[str, Any]] = None) -> None:
        if self._p is None:
            return
        info = ""
        if values:
            keys = [k for k in values if k in ("lm_loss", "fair_loss", "grl_strength") or k.startswith(("mi/", "dac_acc/", "adv_acc/"))]
            info = " ".join(f"{k}={values[k]:.4g}" for k in keys[:6] if isinstance(values[k], (int, float)))
        self._p.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
