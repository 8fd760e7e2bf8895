"""The fused LoRA forward computes what PEFT's forward computes: values, gradients, masks, adapter files."""
from __future__ import annotations

import pytest
import torch

from fairllava.models.loading import LoraSettings, apply_lora
from fairllava.models.lora_fused import LoraGroup, fuse_lora, unfuse_lora
from fairllava.models.precision import autocast
from fairllava.models.tiny import build_tiny_llava


def _model(dropout: float, shared: bool, fp32_sum: str = "auto"):
    """A fused LoRA model with B made non-zero so the branch matters (PEFT's forward: ``unfuse_lora``)."""
    model, _ = build_tiny_llava(seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=dropout, shared_dropout=shared, fused_forward=True,
                                        fp32_sum=fp32_sum))
    g = torch.Generator().manual_seed(3)
    for n, p in sorted(pm.named_parameters()):
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def _both(pm, ids, seed, dtype=None, fp32_sum="auto"):
    """(fused, PEFT's) results of the same model on the same input and the same torch seed."""
    fused = _run(pm, ids, seed, dtype)
    unfuse_lora(pm)
    peft = _run(pm, ids, seed, dtype)
    fuse_lora(pm, fp32_sum)
    return fused, peft


def _lm(pm, name):
    return next(m for n, m in pm.named_modules() if n.endswith(f"language_model.layers.0.{name}"))


def _run(pm, ids, seed, dtype=None):
    pm.train()
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast("cpu", dtype):
        logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


@pytest.mark.parametrize("dropout,shared", [(0.0, True), (0.3, True), (0.3, False)])
def test_fused_forward_equals_peft_in_values_and_gradients(dropout, shared):
    pm = _model(dropout, shared)
    assert sum(hasattr(m, "_fairllava_group") for m in pm.modules()) > 0
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10], [1, 9, 8, 7, 6, 5, 4]])
    (lf, gf), (lp, gp) = _both(pm, ids, seed=7)
    assert not torch.allclose(lf, _run(pm, ids, seed=8)[0]) or dropout == 0  # the masks matter
    # fp32, same masks (drawn in the same order from the same torch seed); addmm vs mul+add rounds differently,
    # so agreement is to float32 accumulation error, not bit-exact
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-5)
    assert set(gf) == set(gp) and any("lora_A" in n for n in gf)
    for n in gp:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("fp32_sum", ["none", "all"])
def test_fused_forward_under_bf16_autocast_matches_peft_to_bf16_rounding(fp32_sum):
    pm = _model(0.3, True, fp32_sum)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    (lf, _), (lp, _) = _both(pm, ids, seed=0, dtype=torch.bfloat16, fp32_sum=fp32_sum)
    ref, _ = _run(pm, ids, seed=0)
    # both bf16 paths sit within bf16 rounding of the fp32 reference, and of each other
    scale = ref.abs().max()
    assert (lf - lp).abs().max() <= 0.05 * scale
    assert (lf - ref).abs().max() <= 0.05 * scale
    if fp32_sum == "all":  # the fp32 sums bring the fused path closer to fp32 than PEFT's bf16 sums
        assert (lf - ref).abs().mean() < (lp - ref).abs().mean()


def test_siblings_share_one_a_matmul_only_when_they_share_a_mask():
    shared, independent = _model(0.3, True), _model(0.3, False)

    def groups(pm):
        return {id(m._fairllava_group): len(m._fairllava_group.layers)
                for m in pm.modules() if hasattr(m, "_fairllava_group")}

    assert sorted(set(groups(shared).values())) == [1, 2, 3]  # o/down alone, gate+up, q+k+v
    assert set(groups(independent).values()) == {1}  # independent PEFT masks cannot share drop(x)


def test_a_sibling_called_on_another_tensor_computes_its_own_branch():
    pm = _model(0.0, True)
    q, k = _lm(pm, "self_attn.q_proj"), _lm(pm, "self_attn.k_proj")
    assert q._fairllava_group is k._fairllava_group
    x1 = torch.randn(2, 3, q.get_base_layer().in_features)
    x2 = torch.randn_like(x1)
    pm.eval()
    q(x1)
    got = k(x2)  # not x1: must not reuse x1's slice
    torch.testing.assert_close(got, k._fairllava_peft_forward(x2), rtol=1e-5, atol=1e-6)
    q(x1)
    with torch.no_grad():
        k.lora_A["default"].weight.mul_(2.0)  # A changed in place after q's call: k must not reuse the cache
    torch.testing.assert_close(k(x1), k._fairllava_peft_forward(x1), rtol=1e-5, atol=1e-6)


def test_fuse_is_idempotent_and_the_adapter_files_are_unchanged(tmp_path):
    from safetensors.torch import load_file

    pm = _model(0.05, True)
    assert fuse_lora(pm) == 0  # already fused
    pm.save_pretrained(tmp_path / "f")
    assert unfuse_lora(pm) > 0
    pm.save_pretrained(tmp_path / "p")
    a, b = load_file(tmp_path / "f" / "adapter_model.safetensors"), load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_merged_adapter_falls_back_to_peft():
    pm = _model(0.0, True)
    ids = torch.tensor([[1, 5, 6, 7]])
    pm.eval()
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        pm.merge_adapter()
        merged = pm(input_ids=ids).logits
        pm.unmerge_adapter()
        with pm.disable_adapter():
            plain = pm(input_ids=ids).logits
    torch.testing.assert_close(before, merged, rtol=1e-4, atol=1e-5)
    assert (before - plain).abs().max() > 1e-3  # the adapter acts, and disabling it is honoured


def _fp32_sum_model(fp32_sum: str):
    model, _ = build_tiny_llava(seed=0)
    pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, fused_forward=True, fp32_sum=fp32_sum))
    for n, p in pm.named_parameters():  # frozen weights bf16, trainables fp32: the training layout
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return pm


def test_fp32_sum_marks_the_residual_writers_or_every_layer():
    def marked(pm):
        return {n.rsplit(".", 1)[-1] for n, m in pm.named_modules() if getattr(m, "_fairllava_fp32_sum", False)}

    assert marked(_fp32_sum_model("none")) == set()
    assert marked(_fp32_sum_model("auto")) == marked(_fp32_sum_model("all"))
    assert marked(_fp32_sum_model("residual")) == {"o_proj", "down_proj"}
    assert marked(_fp32_sum_model("all")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}


def test_fp32_sum_keeps_an_update_that_bf16_rounds_away():
    """The point of the setting: an update below half a bf16 ulp of the base output survives in fp32."""
    outs = {}
    for mode in ("none", "all"):
        layer = _lm(_fp32_sum_model(mode), "self_attn.o_proj")
        with torch.no_grad():
            layer.lora_A["default"].weight.fill_(0.01)
            layer.lora_B["default"].weight.fill_(1e-6)  # early in training: B tiny
        x = torch.full((1, 2, layer.get_base_layer().in_features), 1.0, dtype=torch.bfloat16)
        with autocast("cpu", torch.bfloat16), torch.no_grad():
            outs[mode] = (layer(x), layer.get_base_layer()(x))
    (none, base_n), (full, base_a) = outs["none"], outs["all"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    update = float(layer.scaling["default"]) * (x.float() @ a.t()) @ b.t()  # scale * B(A(x)), fp32
    assert none.dtype == torch.bfloat16 and full.dtype == torch.float32
    lost = ((none.float() - base_n.float()) - update).abs() > 0.5 * update.abs()
    assert lost.float().mean() > 0.5  # bf16 sum: most of the update is rounded away
    torch.testing.assert_close(full - base_a.float(), update, rtol=1e-3, atol=1e-8)


def test_fp32_sum_changes_nothing_in_fp32_or_outside_autocast():
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    ref = {}
    for mode in ("none", "residual", "all"):
        model, _ = build_tiny_llava(seed=0)
        torch.manual_seed(0)  # LoRA's A initialisation
        pm = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, fused_forward=True, fp32_sum=mode))
        with torch.no_grad():
            for n, p in sorted(pm.named_parameters()):
                if "lora_B" in n:
                    p.fill_(0.01)
            ref[mode] = pm(input_ids=ids).logits  # fp32, no autocast
            pm.to(torch.bfloat16)  # bf16 inference layout: no autocast, everything bf16
            ref[mode + " bf16"] = pm(input_ids=ids).logits
    for mode in ("residual", "all"):  # one process computes both sides: bit-exact
        assert torch.equal(ref[mode], ref["none"]) and torch.equal(ref[mode + " bf16"], ref["none bf16"])


def test_fp32_sum_needs_the_fused_forward():
    from fairllava.errors import FairllavaError
    from fairllava.training.config import TrainConfig

    with pytest.raises(ValueError, match="fp32_sum='all' needs fused_forward"):
        LoraSettings(fused_forward=False, fp32_sum="all")
    with pytest.raises(ValueError, match="fp32_sum='fp16'"):
        LoraSettings(fp32_sum="fp16")
    cfg = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o", "method": "lora",
           "lora": {"fused_forward": False, "fp32_sum": "residual"}}
    with pytest.raises(FairllavaError, match="^lora.fp32_sum: 'residual' needs lora.fused_forward: true"):
        TrainConfig.from_dict(cfg)
    assert LoraSettings(fused_forward=False).fp32_sum == "auto"  # the default: none without the fused forward
