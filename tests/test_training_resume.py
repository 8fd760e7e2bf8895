"""Subprocess runs of `fairllava train`: SIGKILL + --resume equals an uninterrupted run; a 2-process run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import make_fixture


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_fixture(tmp_path_factory.mktemp("resumefix"))


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    return env


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"model.path={data / 'model'}", f"data.train={data / 'train.jsonl'}", f"data.image_root={data / 'img'}",
            "data.max_length=64", "logging.progress=false", *extra]
    args = ["train", "--preset", "cpu", "--output-dir", str(out)]
    for s in sets:
        args += ["--set", s]
    return args


RESUME_SETS = ["method=fairllava", "optim.max_steps=12", "optim.per_device_batch_size=4", "checkpointing.every_n_steps=3",
               "checkpointing.keep_last=2", "lora.dropout=0.1"]  # dropout + random-token pooling exercise the RNG restore


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in ("adapter_model.safetensors", "heads.safetensors", "projector.safetensors"):
        out.update({f"{f}:{k}": v for k, v in load_file(str(run / f)).items()})
    return out


def _losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lm_loss"], r["fair_loss"]) for r in rows]


# alternating: the heads and their optimizer live outside the wrapped model; mi_standardize adds running buffers
ALTERNATING_SETS = ["fairness.update_mode=alternating", "fairness.n_dac_steps=2", "fairness.mi_standardize=true",
                    "fairness.mi_l2_normalize=false"]


@pytest.mark.parametrize("extra", [[], ALTERNATING_SETS], ids=["joint", "alternating_standardized"])
def test_sigkill_then_resume_equals_uninterrupted(data, tmp_path, extra):
    cmd = [sys.executable, "-m", "fairllava"]
    sets = RESUME_SETS + extra
    ref = tmp_path / "ref"
    subprocess.run(cmd + _args(data, ref, *sets), env=_env(), check=True, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd + _args(data, run, *sets), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a bound for a loaded machine, not a speed target
    try:
        while not (run / "checkpoints" / "checkpoint-000003").is_dir():
            assert time.time() < deadline, "no checkpoint appeared within 600 s"
            time.sleep(0.02)
            assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "run.json").exists(), "the run finished before the kill; the test proves nothing"
    steps_done = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert steps_done < 12

    res = subprocess.run(cmd + _args(data, run, *sets) + ["--resume"], env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _tensors(ref), _tensors(run)
    assert a.keys() == b.keys()
    if extra:
        assert "heads.safetensors:z_mean" in a and int(a["heads.safetensors:z_batches"]) == 12
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert _losses(ref) == _losses(run)  # same data order, same dropout/token draws
    assert len(list((run / "checkpoints").glob("checkpoint-*"))) == 2  # keep_last


def test_resume_without_checkpoint_refuses_other_runs(data, tmp_path):
    res = subprocess.run([sys.executable, "-m", "fairllava"] + _args(data, tmp_path / "x", "method=dro"), env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "config.method: expected one of" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_process_run_gathers_global_batch(data, tmp_path):
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    out = tmp_path / "ddp"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "fairllava"]
    cmd += _args(data, out, "method=fairllava", "optim.max_steps=2", "optim.per_device_batch_size=2",
                 "fairness.gather_across_ranks=true", "checkpointing.every_n_steps=1")
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and run["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["n_valid/sex"] == 4.0, "MI term must see the global batch (2 ranks x 2 samples, sex always known)"
        assert r["n_samples"] == 4.0
    assert (out / "adapter_model.safetensors").is_file()
