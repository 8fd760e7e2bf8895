"""The shared progress display: live bar on a terminal, plain timed lines otherwise; the library never imports its CLI."""
from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from fairllava.progress import ProgressDisplay, format_seconds, progress_mode


def _display(interval: float) -> tuple[ProgressDisplay, io.StringIO]:
    buf = io.StringIO()
    return ProgressDisplay(mode="plain", interval=interval, out=Console(file=buf, width=200)), buf


def test_plain_lines_start_throttle_and_finish():
    p, buf = _display(interval=3600)
    with p:
        t = p.add_task("stage 2 lora", total=10)
        for _ in range(9):
            p.advance(t)
        assert buf.getvalue().count("\n") == 1  # started; the interval has not passed
        p.update(t, advance=1, info="lm_loss=1.2")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "stage 2 lora: started (10 total)"
    assert re.match(r"stage 2 lora: 10/10 \(100%\), \d+s elapsed, done \| lm_loss=1.2$", lines[1])


def test_plain_lines_every_interval_with_eta():
    p, buf = _display(interval=0)
    t = p.add_task("generate", total=4, completed=1)
    p.advance(t)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("generate: 1/4 (25%)")  # a resumed task reports where it stands
    assert re.match(r"generate: 2/4 \(50%\), \d+s elapsed, ETA \d+s$", lines[1])


def test_disabled_and_env_override(monkeypatch):
    p = ProgressDisplay(enabled=False)
    assert p.mode == "off"
    t = p.add_task("x", total=2)
    p.advance(t)
    p.stop()
    monkeypatch.setenv("FAIRLLAVA_PROGRESS", "plain")
    assert progress_mode() == "plain"
    monkeypatch.setenv("FAIRLLAVA_PROGRESS", "")
    assert progress_mode() == "plain"  # pytest captures stdout: not a terminal
    assert format_seconds(75) == "1m15s" and format_seconds(7300) == "2h01m" and format_seconds(None) == "?"


def test_library_modules_do_not_import_the_cli():
    root = Path(__import__("fairllava").__file__).parent
    pattern = re.compile(r"^\s*(from \.+cli\b|from fairllava\.cli|import fairllava\.cli)", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "cli" not in p.relative_to(root).parts and p.name != "__main__.py" and pattern.search(p.read_text())]
    assert offenders == []
