"""Batched greedy generation: batch == one-by-one, EOS handling, resumability (incl. SIGKILL), CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fairllava.errors import FairllavaError
from fairllava.generation import generate_predictions, partial_path
from fairllava.models.tiny import build_tiny_llava, save_tiny_llava

N = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.RandomState(0)
    recs = []
    for i in range(N):
        Image.fromarray((rng.rand(30 + 3 * i, 40, 3) * 255).astype("uint8")).save(imgs / f"{i}.png")
        recs.append({
            "id": f"s{i}", "group_id": f"p{i}", "image": f"{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nDescribe" + " the chest" * (i % 4) + "."},
                              {"from": "gpt", "value": f"Finding {i}."}],
            "attributes": {"sex": "F" if i % 2 else "M", "age_group": None},
            **({"label": "NV"} if i % 3 == 0 else {}),
        })
    path = root / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"root": root, "images": imgs, "path": path, "records": recs}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0)


def _run(tiny, data, out, **kw):
    model, proc = tiny
    kw.setdefault("max_new_tokens", 8)
    return generate_predictions(model, proc, data["path"], out, image_root=data["images"], progress=False, **kw)


def test_batched_equals_one_by_one_and_rows_follow_the_contract(tiny, data, tmp_path):
    r4 = _run(tiny, data, tmp_path / "b4.jsonl", batch_size=4)
    r1 = _run(tiny, data, tmp_path / "b1.jsonl", batch_size=1)
    a = (tmp_path / "b4.jsonl").read_text()
    assert a == (tmp_path / "b1.jsonl").read_text()
    rows = [json.loads(x) for x in a.splitlines()]
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(N)]
    for r, rec in zip(rows, data["records"]):
        assert set(r) >= {"id", "prediction", "reference", "attributes", "prompt"}
        assert r["reference"] == rec["conversations"][1]["value"]
        assert r["attributes"] == rec["attributes"]
        assert r["prompt"] == rec["conversations"][0]["value"]
        assert r.get("label") == rec.get("label")
        assert r["prediction"] == r["prediction"].strip()
        assert "<image>" not in r["prediction"] and "assistant" not in r["prediction"]
    assert r4.n_generated == r1.n_generated == N and r4.new_tokens == r1.new_tokens > 0
    assert not partial_path(tmp_path / "b4.jsonl").exists()


def test_eos_stops_and_text_is_decoded(tiny, data, tmp_path):
    model, proc = build_tiny_llava(seed=0)
    tok = proc.tokenizer
    word = next(i for i in range(len(tok)) if tok.decode([i]).startswith(" ") and tok.decode([i]).strip().isalpha()
                and len(tok.decode([i]).strip()) >= 3)
    text = tok.decode([word]).strip()
    head = torch.nn.Linear(model.config.text_config.hidden_size, model.config.text_config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 5.0
    model.lm_head = head
    res = generate_predictions(model, proc, data["path"], tmp_path / "eos.jsonl", image_root=data["images"],
                               batch_size=3, max_new_tokens=7, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "eos.jsonl").read_text().splitlines()]
    assert all(r["prediction"] == "" for r in rows)
    assert res.new_tokens == N  # one EOS per sample, nothing after it
    with torch.no_grad():
        head.bias.zero_()
        head.bias[word] = 5.0
    generate_predictions(model, proc, data["path"], tmp_path / "w.jsonl", image_root=data["images"],
                         batch_size=3, max_new_tokens=3, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert all(r["prediction"] == f"{text} {text} {text}" for r in rows)


def test_resume_skips_done_ids_and_drops_a_partial_line(tiny, data, tmp_path):
    ref = tmp_path / "ref.jsonl"
    _run(tiny, data, ref, batch_size=3)
    lines = ref.read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    # simulate a kill: 4 complete lines and half of the 5th in the partial file
    partial_path(out).write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    res = _run(tiny, data, out, batch_size=3)
    assert res.n_resumed == 4 and res.n_generated == N - 4
    assert out.read_text() == ref.read_text()
    # a finished file: nothing left to do, file unchanged
    res = _run(tiny, data, out, batch_size=3)
    assert res.n_generated == 0 and out.read_text() == ref.read_text()


def test_resume_rejects_foreign_rows_and_no_resume_starts_over(tiny, data, tmp_path):
    out = tmp_path / "out.jsonl"
    partial_path(out).write_text(json.dumps({"id": "other", "prediction": "x"}) + "\n")
    with pytest.raises(FairllavaError, match="id=other.*not in the input"):
        _run(tiny, data, out)
    partial_path(out).write_text("{not json\n")
    with pytest.raises(FairllavaError, match=r"out\.jsonl\.partial:1: invalid JSON"):
        _run(tiny, data, out)
    res = _run(tiny, data, out, resume=False, batch_size=5)
    assert res.n_generated == N and len(out.read_text().splitlines()) == N


def test_bad_arguments(tiny, data, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        _run(tiny, data, tmp_path / "x.jsonl", batch_size=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(FairllavaError, match="bad.jsonl:1"):
        generate_predictions(*tiny, bad, tmp_path / "y.jsonl", image_root=data["images"], progress=False)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from fairllava.models.tiny import build_tiny_llava
    from fairllava.generation import generate_predictions
    model, proc = build_tiny_llava(seed=0)
    orig = model.generate
    def slow_generate(*a, **k):  # widen the window between batches so the parent can kill mid-run
        out = orig(*a, **k)
        time.sleep(0.4)
        return out
    model.generate = slow_generate
    generate_predictions(model, proc, sys.argv[1], sys.argv[2], image_root=sys.argv[3], batch_size=2,
                         max_new_tokens=8, progress=False)
    """
)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_file(tiny, data, tmp_path):
    ref = tmp_path / "ref.jsonl"
    _run(tiny, data, ref, batch_size=2)
    out = tmp_path / "killed.jsonl"
    part = partial_path(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(data["path"]), str(out), str(data["images"])],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if part.exists() and part.read_text().count("\n") >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"generation subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    n_done = part.read_text().count("\n")
    assert 2 <= n_done < N
    res = _run(tiny, data, out, batch_size=2)
    assert res.n_resumed == n_done
    assert out.read_bytes() == ref.read_bytes()
    assert not part.exists()


def test_cli_generate_with_adapter_and_merge(tiny, data, tmp_path):
    from typer.testing import CliRunner

    from fairllava.cli import app
    from fairllava.models.loading import LoraSettings, apply_lora

    save_tiny_llava(tmp_path / "base", seed=0)
    model, proc = build_tiny_llava(seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.03)
    pm.save_pretrained(tmp_path / "adapter")
    runner = CliRunner()
    args = ["generate", "--model", str(tmp_path / "base"), "--data", str(data["path"]), "--images",
            str(data["images"]), "--batch-size", "4", "--max-new-tokens", "6"]
    r = runner.invoke(app, args + ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "pa.jsonl")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                            "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "merged"), "--data", str(data["path"]), "--images",
                            str(data["images"]), "--batch-size", "4", "--max-new-tokens", "6",
                            "--out", str(tmp_path / "pm.jsonl")])
    assert r.exit_code == 0, r.output
    pa = [json.loads(x)["prediction"] for x in (tmp_path / "pa.jsonl").read_text().splitlines()]
    pmg = [json.loads(x)["prediction"] for x in (tmp_path / "pm.jsonl").read_text().splitlines()]
    assert len(pa) == N and pa == pmg
    # the adapter changes the generations compared to the base model
    r = runner.invoke(app, args + ["--out", str(tmp_path / "pb.jsonl")])
    assert r.exit_code == 0, r.output
    pb = [json.loads(x)["prediction"] for x in (tmp_path / "pb.jsonl").read_text().splitlines()]
    assert pb != pa


def test_cli_generate_bad_model_is_one_line_error(data, tmp_path, monkeypatch, capsys):
    from fairllava.cli import main

    monkeypatch.setattr(sys, "argv", ["fairllava", "generate", "--model", str(tmp_path / "missing"),
                                      "--data", str(data["path"]), "--out", str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "model folder not found" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()
