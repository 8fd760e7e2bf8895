"""GPU checks (marker ``gpu``): the bf16 device path against CPU fp32, and hook capture under gradient checkpointing.

Skipped without a CUDA device. ``FAIRLLAVA_GPU_TESTS_ON_CPU=1`` runs them on the CPU with bf16 autocast instead
(what ``bench/gpu_check.py --tiny`` does, so CI proves these tests themselves work). Run on a GPU machine with
``pytest -m gpu tests/test_gpu.py`` (``make gpu-check`` does).

Tolerances come from bf16 arithmetic, not from tuning. bf16 keeps 8 significant bits: unit roundoff
u = 2**-8. Under autocast a Linear rounds its inputs and weights to bf16, accumulates in fp32 and rounds the
output, so each logit carries independent relative roundings of its D products (sd ~ u * ||z * w||_2) plus u of
its own size. Everything after the logits runs in fp32, and log_softmax moves by at most 2 * max|dl| per entry
(log-sum-exp is 1-Lipschitz in the max norm), so the CLUB estimate — a difference of two means of log-probs —
moves by at most 4 * max|dl|: given the observed logit error the value bound is exact, not fitted.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

U = 2.0 ** -8  # bf16 unit roundoff

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("FAIRLLAVA_GPU_TESTS_ON_CPU") == "1":
    DEVICE = torch.device("cpu")
else:
    DEVICE = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device (FAIRLLAVA_GPU_TESTS_ON_CPU=1 runs these on the CPU)"),
]


def _autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- CLUB
def test_club_bf16_logits_on_device_within_rounding_bound():
    """CLUB from bf16 logits on the device vs fp32 on the CPU: value within 4 * max|dl|, gradient within u-scale."""
    from fairllava.regularizer.club import club_mi

    g = torch.Generator().manual_seed(0)
    n, k = 512, 8
    y = torch.randint(0, k, (n,), generator=g)
    y[::17] = -100  # unknown attribute values are ignored on both paths
    logits = torch.randn(n, k, generator=g) * 2.0
    logits[torch.arange(n), y.clamp_min(0)] += 3.0  # a strongly informative head: MI far from 0
    ref_in = logits.clone().requires_grad_(True)
    ref = club_mi(ref_in, y)
    ref.backward()
    ref = ref.detach()
    dev_in = logits.to(DEVICE, torch.bfloat16).requires_grad_(True)
    val = club_mi(dev_in, y.to(DEVICE))
    val.backward()
    assert val.dtype == torch.float32  # computed in fp32 whatever the input precision
    dl = float((dev_in.detach().float().cpu() - logits).abs().max())
    assert 0 < dl <= U * float(logits.abs().max())  # only the bf16 rounding of the inputs differs
    assert float(ref) > 0.5
    assert abs(float(val) - float(ref)) <= 4 * dl
    # d CLUB / d logits is a difference of softmax probabilities (/ n); they move by a factor e^{+-2 dl}
    assert _rel(dev_in.grad.float(), ref_in.grad) <= 2 * (2 * dl) + 2 * U


# ----------------------------------------------------------------------------- regulariser
def _planted_hidden(n_rows, t, d, labels, strength, seed=0):
    """Hidden states whose image tokens carry a class direction per attribute (so the DAC heads can read it)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, t, d, generator=g)
    dirs = {}
    for a, y in labels.items():
        k = int(y.max()) + 1
        e = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1)
        dirs[a] = e
        h[:, : t // 2] += strength * e[y.clamp_min(0)][:, None, :]
    return h, dirs


@pytest.mark.parametrize("heads_in_autocast", [False, True], ids=["trainer-path", "all-autocast"])
def test_regularizer_bf16_on_device_matches_cpu_fp32(heads_in_autocast):
    """The mimic_cxr estimator (image tokens, one random token per row) on bf16 hidden states on the device vs fp32
    on the CPU: same tokens, MI and loss within the bf16 bound, gradients close.

    trainer-path: what TrainingModule does (the model emits bf16 states; the regulariser runs in fp32 on fp32
    copies, autocast off). all-autocast: the regulariser itself under bf16 autocast (heads' matmuls in bf16)."""
    from fairllava.regularizer import FairnessConfig, FairnessRegularizer
    from fairllava.training.config import preset_dict

    cfg = FairnessConfig.from_dict(dict(preset_dict("mimic_cxr")["fairness"]))
    b, t, d = 16, 48, 4096  # paper hidden size: the bf16 error grows with the dot-product length
    nk = {a: s.num_classes for a, s in cfg.attributes.items()}
    labels = {a: torch.arange(b) % k for a, k in nk.items()}
    labels["race"][3] = -100
    hidden, dirs = _planted_hidden(b, t, d, labels, strength=16.0)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, -3:] = 0
    image = torch.zeros(b, t, dtype=torch.bool)
    image[:, : t // 2] = True

    def make():
        reg = FairnessRegularizer(cfg, hidden_size=d)
        with torch.no_grad():
            for a, head in reg.heads.items():  # heads that read the planted directions: MI well above 0
                head.weight.copy_(10.0 * dirs[a])
                head.bias.zero_()
        return reg

    ref_reg, dev_reg, probe = make(), make().to(DEVICE), make().to(DEVICE)
    h_ref = hidden.clone().requires_grad_(True)
    out_ref = ref_reg(hidden_states=[h_ref], token_mask=ref_reg.select_tokens(attn, image), labels=labels, step=0)
    out_ref["loss"].backward()
    h_dev = hidden.to(DEVICE, torch.bfloat16).requires_grad_(True)
    lab_dev = {a: y.to(DEVICE) for a, y in labels.items()}
    mask_dev = dev_reg.select_tokens(attn.to(DEVICE), image.to(DEVICE))
    amp = _autocast() if heads_in_autocast else contextlib.nullcontext()
    with amp:
        out_dev = dev_reg(hidden_states=[h_dev.float()], token_mask=mask_dev, labels=lab_dev, step=0)
    out_dev["loss"].backward()

    # the logit error the device path actually has (same seeded token draw as the regulariser's first call)
    with torch.no_grad():
        z_cpu, _ = make().pool([hidden], ref_reg.select_tokens(attn, image))
        with _autocast() if heads_in_autocast else contextlib.nullcontext():
            z_dev, _ = probe.pool([h_dev.detach().float()], mask_dev)
            l_devs = {a: probe.heads[a](z_dev.float()).float().cpu() for a in nk}
        dl = {}
        for a in nk:
            l_dev = l_devs[a]
            l_ref = ref_reg.heads[a](z_cpu)
            w_z = (z_cpu[:, None, :] * ref_reg.heads[a].weight[None]).norm(dim=-1)  # ||z * w_k||_2 per logit
            dl[a] = float((l_dev - l_ref).abs().max())
            bound = float((6 * U * w_z + 2 * U * l_ref.abs()).max())  # 6 sd of the roundings + output rounding
            assert dl[a] <= bound, (a, dl[a], bound)
    for a in nk:
        mi_ref, mi_dev = out_ref["logs"][f"mi/{a}"], out_dev["logs"][f"mi/{a}"]
        assert mi_ref > 0.2, (a, mi_ref)
        assert abs(mi_dev - mi_ref) <= 4 * dl[a] * 1.25 + 1e-4, (a, mi_dev, mi_ref, dl[a])
    lam, wd = cfg.fairness_lambda, cfg.dac_loss_weight
    loss_bound = lam * sum((4 * cfg.attributes[a].weight + 2 * wd) * dl[a] for a in nk) * 1.25 + 1e-4
    assert abs(float(out_dev["loss"].detach()) - float(out_ref["loss"].detach())) <= loss_bound

    g_ref, g_dev = h_ref.grad, h_dev.grad.float().cpu()
    assert torch.equal(g_ref.abs().sum(-1) > 0, g_dev.abs().sum(-1) > 0)  # the same token of each row got the penalty
    assert (g_ref.abs().sum(-1) > 0).sum() == b
    worst = max(dl.values())
    assert _rel(g_dev, g_ref) <= 4 * worst + 4 * U
    for a in nk:  # the DAC heads (fp32 parameters) learn from the same z
        assert _rel(dev_reg.heads[a].weight.grad, ref_reg.heads[a].weight.grad) <= 4 * dl[a] + 4 * U


# ----------------------------------------------------------------------------- hook capture
def _tiny_lora_model(dropout=0.0):
    from fairllava.models.loading import LoraSettings, apply_lora
    from fairllava.models.precision import prepare_for_training
    from fairllava.models.tiny import build_tiny_llava

    model, proc = build_tiny_llava(seed=0, text_layers=4)
    model.to(DEVICE, torch.bfloat16)
    model = apply_lora(model, LoraSettings(r=8, alpha=16, dropout=dropout))
    prepare_for_training(model, torch.bfloat16)  # bf16 frozen weights, fp32 trainable ones (the trainer's layout)
    model.train()
    return model, proc


def _inputs(proc, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = proc.tokenizer
    img = tok.convert_tokens_to_ids("<image>")
    ids = torch.cat([torch.randint(10, 500, (b, 3), generator=g), torch.full((b, 16), img),
                     torch.randint(10, 500, (b, 8), generator=g)], dim=1)
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0
    return {"input_ids": ids.to(DEVICE), "attention_mask": attn.to(DEVICE),
            "pixel_values": torch.randn(b, 3, 32, 32, generator=g).to(DEVICE)}


def test_capture_equals_output_hidden_states_with_checkpointing():
    """Hooks see exactly output_hidden_states under gradient checkpointing + LoRA + bf16, and the backward replay
    neither overwrites them nor changes the gradients of a loss on them."""
    from fairllava.models.hidden_states import HiddenStateCapture

    model, proc = _tiny_lora_model()
    inputs = _inputs(proc)
    idx = [0, 2, 4]

    def run(checkpointing: bool):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        with HiddenStateCapture(model, idx) as cap, _autocast():
            out = model(**inputs, use_cache=False, output_hidden_states=True)
        kept = {i: cap.states[i] for i in idx}
        for i in idx:
            assert torch.equal(cap.states[i], out.hidden_states[i]), i
        loss = sum(cap.states[i].float().pow(2).mean() for i in idx) + out.logits.float().logsumexp(-1).mean()
        loss.backward()
        assert all(cap.states[i] is kept[i] for i in idx)  # the recompute in backward stored nothing
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {i: s.detach().float() for i, s in kept.items()}, grads

    states_gc, grads_gc = run(True)
    states_ref, grads_ref = run(False)
    for i in idx:
        assert torch.equal(states_gc[i], states_ref[i]), i  # recomputation does not change the forward
    lora = [n for n in grads_ref if "lora_" in n]
    assert lora and all(torch.isfinite(grads_gc[n]).all() for n in grads_gc)
    assert sum(float(grads_ref[n].abs().sum()) for n in lora) > 0
    for n in grads_ref:  # the recomputed backward equals the stored one up to kernel-order (fp32 accumulation) noise
        assert _rel(grads_gc[n], grads_ref[n]) <= 4 * U, n


def test_training_step_bf16_fairllava_on_device():
    """One TrainingModule step of the fairllava method (tiny model, bf16 autocast, checkpointing): finite loss and
    non-zero finite gradients for LoRA, projector and DAC heads."""
    from fairllava.regularizer import FairnessConfig, FairnessRegularizer
    from fairllava.training.methods import FairLLaVAMethod
    from fairllava.training.trainer import TrainingModule

    model, proc = _tiny_lora_model(dropout=0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = FairnessConfig.from_dict({"attributes": {"sex": {"num_classes": 2, "weight": 1.0}}})
    method = FairLLaVAMethod(FairnessRegularizer(cfg, hidden_size=64).to(DEVICE), cfg)
    module = TrainingModule(model, method, method.hidden_indices(5), compact_logits=True, compute_dtype=torch.bfloat16)
    batch = _inputs(proc, b=4)
    labels = batch["input_ids"].clone()
    labels[:, :19] = -100
    batch.update(labels=labels, image_mask=batch["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>"),
                 attr_labels={"sex": torch.tensor([0, 1, 0, 1], device=DEVICE)})
    with _autocast():  # accelerate's mixed_precision=bf16 wraps the prepared module in autocast
        loss, logs, _ = module(batch, 0.0, 0)
    loss.backward()
    assert torch.isfinite(loss) and "mi/sex" in logs
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for part in ("lora_", "multi_modal_projector", "heads."):
        grads = [p.grad for n, p in named.items() if part in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert sum(float(g.abs().sum()) for g in grads) > 0, part
