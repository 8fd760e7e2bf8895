"""bench/gpu_check.py on the CPU: ``--tiny`` runs every phase and prints every figure; no GPU without --tiny -> exit 2.

The device check must be correct the first time it meets an H200, so CI runs the same script (same phases, same
project code path) with the small config.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"

# Every figure of the summary table (named here, independently of the script, so a dropped figure fails).
FIGURES = [
    "build.seconds", "build.params_b", "build.weights_gb", "train.collate_s",
    *[f"train.{m}.{k}" for m in ("lora", "fairllava", "adversarial") for k in ("step_s", "tokens_per_s", "peak_gb")],
    *[f"train.{m}.{k}" for m in ("fairllava", "adversarial") for k in ("time_ratio", "mem_ratio")],
    "train.ideal_step_s", "train.lora.mfu",
    "gen.bs1.tokens_per_s", "gen.batched.tokens_per_s", "gen.speedup", "gen.ideal_bs1_tokens_per_s",
    "tests.passed", "fsdp.steps", "fsdp.seconds",
]


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


@pytest.mark.slow
def test_tiny_check_runs_every_phase_and_prints_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--json", str(out)], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["phases"]["install"]["status"] == "skipped"  # --tiny defaults to --no-install
    for name in ("versions", "build", "train", "generate", "tests", "fsdp"):
        assert data["phases"][name]["status"] == "ok", (name, data["phases"][name])
    figs = {k: v["value"] for k, v in data["figures"].items()}
    missing = [k for k in FIGURES if k not in figs]
    assert not missing, missing
    for k in FIGURES:
        assert isinstance(figs[k], (int, float)) and math.isfinite(figs[k]) and figs[k] > 0, (k, figs[k])
    table = r.stdout[r.stdout.index("== summary"):]
    for k in FIGURES:  # the closing table shows each figure too
        assert any(line.split()[:1] == [k] for line in table.splitlines()), k
    assert figs["tests.passed"] >= 5 and data["figures"]["tests.passed"]["unit"] == f"of {figs['tests.passed']}"
    assert figs["fsdp.steps"] == 4
    assert figs["gen.speedup"] > 1.0  # batching must beat one-by-one decoding even on the CPU
    # figures are printed as they are measured, before the summary
    assert r.stdout.index("train.fairllava.time_ratio =") < r.stdout.index("== summary")


def test_no_gpu_without_tiny_exits_2_with_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=REPO, env=_env(CUDA_VISIBLE_DEVICES=""),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--tiny" in lines[0], lines
    assert not out.exists()  # nothing half-run
