"""The console and progress display shared by every long-running part of fairllava.

Why one low-level module: training, generation, the audit and the benchmark all report progress, and
the library must not depend on its own CLI layer for it. On a terminal the display is a live rich bar
with an ETA; when output goes to a file (``nohup``, SLURM, a benchmark worker's log) a live bar shows
nothing until it ends, so the display prints one plain line per task every ~30 s instead.

``FAIRLLAVA_PROGRESS=rich|plain|off`` forces a mode; ``FAIRLLAVA_PROGRESS_INTERVAL`` (seconds, default 30)
sets how often plain lines are printed.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

from rich.console import Console

#: The one stderr console of the library and the CLI (``fairllava.cli._app`` re-exports it).
console = Console(stderr=True)

PLAIN_INTERVAL_S = 30.0


def progress_mode() -> str:
    """``rich`` when stdout and the console are terminals, ``plain`` otherwise (or the env override)."""
    forced = os.environ.get("FAIRLLAVA_PROGRESS", "").strip().lower()
    if forced in ("rich", "plain", "off"):
        return forced
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "rich" if tty and console.is_terminal else "plain"


def plain_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("FAIRLLAVA_PROGRESS_INTERVAL", PLAIN_INTERVAL_S)))
    except ValueError:
        return PLAIN_INTERVAL_S


def format_seconds(s: Optional[float]) -> str:
    if s is None or s != s or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _PlainTask:
    def __init__(self, description: str, total: Optional[float], completed: float, fields: dict) -> None:
        self.description, self.total, self.completed, self.fields = description, total, completed, dict(fields)
        self.t0 = time.monotonic()
        self.start_completed = completed
        self.finished = False

    def eta(self) -> Optional[float]:
        done = self.completed - self.start_completed
        if not self.total or done <= 0:
            return None
        return (time.monotonic() - self.t0) / done * max(0.0, self.total - self.completed)

    def line(self) -> str:
        elapsed = format_seconds(time.monotonic() - self.t0)
        if self.total:
            pct = 100.0 * self.completed / self.total
            head = f"{self.description}: {self.completed:g}/{self.total:g} ({pct:.0f}%)"
        else:
            head = f"{self.description}: {self.completed:g}"
        eta = "done" if self.finished else f"ETA {format_seconds(self.eta())}"
        info = str(self.fields.get("info") or "")
        return f"{head}, {elapsed} elapsed, {eta}" + (f" | {info}" if info else "")


class ProgressDisplay:
    """The subset of ``rich.progress.Progress`` fairllava uses (``add_task`` / ``advance`` / ``update``).

    ``rich`` mode delegates to a live rich bar (description, bar, M/N, elapsed, ETA, an ``info`` field);
    ``plain`` mode prints ``description: M/N (P%), elapsed, ETA`` when a task starts, at most every
    ``interval`` seconds while it runs, and when it completes; ``off`` (or ``enabled=False``) does nothing.
    """

    def __init__(self, enabled: bool = True, transient: bool = False, mode: Optional[str] = None,
                 interval: Optional[float] = None, out: Optional[Console] = None) -> None:
        self.mode = (mode or progress_mode()) if enabled else "off"
        self.interval = plain_interval() if interval is None else interval
        self.console = out or console
        self._rich = None
        self._tasks: dict[int, _PlainTask] = {}
        self._last = 0.0
        if self.mode == "rich":
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                  console=self.console, transient=transient)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._rich is not None:
            self._rich.start()

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()

    def __enter__(self) -> "ProgressDisplay":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    # ------------------------------------------------------------------ tasks
    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0, **fields: Any) -> int:
        fields.setdefault("info", "")
        if self._rich is not None:
            return self._rich.add_task(description, total=total, completed=completed, **fields)
        tid = len(self._tasks)
        if self.mode == "plain":
            task = _PlainTask(description, total, completed, fields)
            self._tasks[tid] = task
            self._print(task.line() if completed else f"{description}: started"
                        + (f" ({total:g} total)" if total else ""))
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: Optional[float] = None, total: Optional[float] = None,
               advance: Optional[float] = None, description: Optional[str] = None, **fields: Any) -> None:
        if self._rich is not None:
            kw: dict = {k: v for k, v in (("completed", completed), ("total", total), ("advance", advance),
                                          ("description", description)) if v is not None}
            self._rich.update(task_id, **kw, **fields)
            return
        task = self._tasks.get(task_id)
        if task is None:
            return
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        now = time.monotonic()
        if task.total and task.completed >= task.total and not task.finished:
            task.finished = True
            self._print(task.line())
        elif now - self._last >= self.interval and not task.finished:
            self._print(task.line())

    def _print(self, line: str) -> None:
        self._last = time.monotonic()
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)


def progress_display(enabled: bool = True, transient: bool = False) -> ProgressDisplay:
    """A :class:`ProgressDisplay` in the mode the environment calls for (disabled: a no-op)."""
    return ProgressDisplay(enabled=enabled, transient=transient)


__all__ = ["ProgressDisplay", "console", "format_seconds", "plain_interval", "progress_display", "progress_mode"]
