"""Compute precision (models/precision.py) and the shared LoRA dropout (models/lora_dropout.py)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from fairllava.errors import FairllavaError
from fairllava.models import precision
from fairllava.models.lora_dropout import SharedInputDropout, bernoulli_keep_mask, share_lora_dropout
from fairllava.models.loading import LoraSettings, apply_lora
from fairllava.models.tiny import build_tiny_llava


def test_auto_follows_detected_bf16_support(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    assert precision.resolve_dtype("auto", "cpu") == torch.float32
    assert precision.resolve_dtype(None, "cpu") == torch.float32
    assert precision.resolve_dtype("float32", "cpu") == torch.float32
    assert precision.resolve_dtype("bf16", "cpu") == torch.bfloat16  # alias; runs, but warns (below)


def test_detection_falls_back_to_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    real_open = builtins.open
    for flags, want in (("flags : fpu avx2 avx512f", False), ("flags : fpu avx512f amx_bf16 amx_tile", True),
                        ("flags : fpu avx512_bf16", True)):
        fake = tmp_path / "cpuinfo"
        fake.write_text(flags)
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(fake if f == "/proc/cpuinfo" else f, *a, **k))
        precision.cpu_has_bf16_matmul.cache_clear()
        assert precision.cpu_has_bf16_matmul() is want, flags
    monkeypatch.setattr(builtins, "open", real_open)
    precision.cpu_has_bf16_matmul.cache_clear()


def test_bf16_without_support_warns_once_and_unknown_dtype_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    monkeypatch.setattr(precision, "_warned_slow", set())
    with pytest.warns(UserWarning, match="bfloat16 on a cpu without bf16 matmul"):
        precision.resolve_dtype("bfloat16", "cpu", key="model.dtype")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.resolve_dtype("bfloat16", "cpu", key="model.dtype")  # once only
    with pytest.raises(FairllavaError, match=r"^model\.dtype='float64': expected one of auto, float32"):
        precision.resolve_dtype("float64", "cpu", key="model.dtype")


def test_train_config_rejects_an_unknown_dtype_naming_the_key(tmp_path):
    from fairllava.training.config import TrainConfig

    with pytest.raises(FairllavaError, match=r"model\.dtype"):
        TrainConfig.from_dict({"model": {"path": "x", "dtype": "float64"}, "data": {"train": "t.jsonl"},
                               "output_dir": str(tmp_path / "r")})


@pytest.mark.parametrize("fused", [True, False])
def test_mixed_precision_layout_and_fp32_losses(fused):
    model, _ = build_tiny_llava(seed=0)
    model.to(torch.bfloat16)  # what load_vlm(dtype=bfloat16) gives
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.1, fused_forward=fused))
    precision.prepare_for_training(pm, torch.bfloat16)
    for n, p in pm.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    # no per-layer upcast of LoRA inputs; the matmuls run in bf16 (autocast)
    seen = []
    hook = [m.register_forward_hook(lambda m, i, o: seen.extend([(i[0].dtype, o.dtype)]))
            for n, m in pm.named_modules()
            if n.endswith("q_proj.lora_A.default") or (n.endswith("q_proj") and hasattr(m, "lora_A"))]
    ids = torch.tensor([[1, 5, 6, 7]])
    with precision.autocast("cpu", torch.bfloat16):
        out = pm(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hook:
        h.remove()
    if fused:  # lora.fp32_sum auto = all: each LoRA sum is fp32, so from layer 1 on the residual stream is fp32 too
        assert seen and seen[0] == (torch.bfloat16, torch.float32) and all(o == torch.float32 for _, o in seen)
        assert len(seen) > 1 and all(i == torch.float32 for i, _ in seen[1:])
    else:  # PEFT's forward (fp32_sum auto = none): activations stay bf16 through the LoRA layers
        assert seen and all(i == torch.bfloat16 and o == torch.bfloat16 for i, o in seen)
    assert out.logits.dtype == torch.bfloat16
    with precision.autocast("cpu", torch.bfloat16), precision.full_precision("cpu"):
        lin = torch.nn.Linear(4, 2)
        assert lin(torch.randn(3, 4)).dtype == torch.float32  # the regulariser's heads would run fp32 here


def test_keep_mask_rate_is_exact_and_lanes_are_uniform():
    keep, rate = bernoulli_keep_mask(torch.Size([1_000_003]), 0.05, torch.device("cpu"))
    assert rate == round(0.05 * 65536) / 65536
    dropped = (~keep).double().mean().item()
    sd = math.sqrt(rate * (1 - rate) / keep.numel())
    assert abs(dropped - rate) < 5 * sd
    # each of the four int16 lanes of an int64 word drops at the same rate (a biased top bit would show here)
    lanes = (~keep[: (keep.numel() // 4) * 4]).view(-1, 4).double().mean(0)
    assert torch.all((lanes - rate).abs() < 5 * math.sqrt(rate * (1 - rate) / (keep.numel() // 4)))


def test_shared_dropout_is_unbiased_and_shares_only_the_same_tensor():
    torch.manual_seed(0)
    d = SharedInputDropout(0.3).train()
    x = torch.randn(400, 500, requires_grad=True)
    a, b = d(x), d(x)
    assert a is b  # q/k/v of one layer read one masked input
    c = d(x.clone())  # an equal but distinct tensor gets its own mask
    assert not torch.equal((a == 0), (c == 0))
    keep = a != 0
    assert abs(1 - keep.double().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(a[keep], x[keep] / (1 - round(0.3 * 65536) / 65536))
    a.sum().backward()
    assert torch.equal(x.grad != 0, keep)
    ones = torch.ones(2000, 2000)
    assert abs(d(ones).mean().item() - 1.0) < 0.01  # E[dropout(x)] = x
    d.eval()
    assert d(x) is x


def _lora_inputs(pm, x_ids):
    """Inputs seen by lora_A of q/k/v and gate/up of layer 0 in one training forward."""
    seen = {}
    hooks = []
    for n, m in pm.named_modules():
        for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            if n.endswith(f"layers.0.self_attn.{proj}.lora_A.default") or n.endswith(f"layers.0.mlp.{proj}.lora_A.default"):
                hooks.append(m.register_forward_hook(lambda m, i, o, proj=proj: seen.update({proj: i[0].detach()})))
    pm.train()
    pm(input_ids=x_ids, attention_mask=torch.ones_like(x_ids))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("shared", [True, False])
def test_lora_layers_reading_one_input_share_its_mask_only_when_asked(shared):
    model, _ = build_tiny_llava(seed=0)
    # PEFT's forward: the hooks read what enters each lora_A (the fused path calls no lora_A module)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.5, shared_dropout=shared, fused_forward=False))
    torch.manual_seed(1)
    seen = _lora_inputs(pm, torch.tensor([[1, 5, 6, 7, 8, 9]]))
    assert set(seen) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    same_attn = torch.equal(seen["q_proj"], seen["k_proj"]) and torch.equal(seen["k_proj"], seen["v_proj"])
    same_mlp = torch.equal(seen["gate_proj"], seen["up_proj"])
    assert same_attn is shared and same_mlp is shared


def test_share_lora_dropout_leaves_identity_alone_and_keeps_the_adapter_loadable(tmp_path):
    from peft import PeftModel

    model, _ = build_tiny_llava(seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert share_lora_dropout(pm) == 0
    model, _ = build_tiny_llava(seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.05))
    pm.save_pretrained(tmp_path / "ad")
    fresh, _ = build_tiny_llava(seed=0)
    PeftModel.from_pretrained(fresh, str(tmp_path / "ad"))  # the shared module adds nothing to the saved adapter


def test_mixed_precision_must_agree_with_the_model_dtype():
    from fairllava.training.config import TrainConfig
    from fairllava.training.trainer import _check_precision_agrees

    def cfg(dtype, mp):
        return TrainConfig.from_dict({"model": {"path": "x", "dtype": dtype}, "data": {"train": "t.jsonl"},
                                      "output_dir": "o", "method": "lora", "optim": {"mixed_precision": mp}})

    _check_precision_agrees(cfg("bfloat16", "bf16"), torch.bfloat16)
    _check_precision_agrees(cfg("auto", "no"), torch.bfloat16)
    with pytest.raises(FairllavaError, match=r"^optim\.mixed_precision=bf16 contradicts model\.dtype=float32"):
        _check_precision_agrees(cfg("float32", "bf16"), torch.float32)
    with pytest.raises(FairllavaError, match=r"model\.dtype=float16 needs optim\.mixed_precision: fp16"):
        _check_precision_agrees(cfg("float16", "no"), torch.float16)


def test_store_in_compute_dtype_keeps_the_trained_module_and_layernorms_in_fp32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight.copy_(1 + torch.randn(8) * 1e-3)  # values bf16 cannot hold
    before = {k: v.clone() for k, v in model.state_dict().items()}
    precision.store_in_compute_dtype(model, torch.bfloat16, keep_fp32=model[2])
    assert model[0].weight.dtype == torch.bfloat16
    for k in ("1.weight", "1.bias", "2.weight", "2.bias"):  # fp32, exactly the loaded values
        assert model.state_dict()[k].dtype == torch.float32 and torch.equal(model.state_dict()[k], before[k]), k
    with precision.autocast("cpu", torch.bfloat16):  # an fp32 residual stream (lora.fp32_sum) and a bf16 one
        for x in (torch.randn(2, 8), torch.randn(2, 8).to(torch.bfloat16)):
            assert torch.isfinite(model[1](x).float()).all()
    fp32 = torch.nn.Sequential(torch.nn.LayerNorm(4))
    precision.store_in_compute_dtype(fp32, torch.float32)
    assert fp32[0].weight.dtype == torch.float32
