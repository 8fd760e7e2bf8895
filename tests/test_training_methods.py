"""Method building blocks: gradient reversal, GRL schedule, discriminator, per-sample LM loss, gradient routing."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from fairllava.training.methods import (
    DACMLP, AdversarialMethod, GradientReversal, LinearRampSchedule, ReweightMethod, grad_reverse, masked_mean,
    per_sample_lm_loss, token_mean_lm_loss,
)


def test_gradient_reversal_scales_and_flips():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    (grad_reverse(x, 0.7) * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)
    assert torch.equal(grad_reverse(x, 0.7), x)


def test_gradient_reversal_requires_float_strength():
    x = torch.randn(2, requires_grad=True)
    with pytest.raises(TypeError, match="strength must be a float"):
        GradientReversal.apply(x, None)
    with pytest.raises(TypeError):
        GradientReversal.apply(x)  # the reference's bug: strength never passed


def test_linear_ramp_schedule():
    s = LinearRampSchedule(start=0.1, end=1.0, from_frac=0.01, to_frac=0.9)
    assert s(0.0) == pytest.approx(0.1) and s(0.01) == pytest.approx(0.1)
    assert s(0.9) == pytest.approx(1.0) and s(1.0) == pytest.approx(1.0)
    mid = (0.01 + 0.9) / 2
    assert s(mid) == pytest.approx(0.55)
    vals = [s(p / 100) for p in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError):
        LinearRampSchedule(0.1, 1.0, 0.9, 0.5)


def test_dacmlp_architecture_and_shapes():
    d = DACMLP(hidden_size=16, num_taps=3, num_classes=5, dropout=0.1)
    assert len(d.per_layer) == 3
    blk = d.per_layer[0]
    assert isinstance(blk[0], torch.nn.LayerNorm) and blk[1].in_features == 16 and blk[1].out_features == 16
    assert isinstance(blk[2], torch.nn.GELU) and isinstance(blk[3], torch.nn.Dropout)
    assert d.head[0].out_features == 32 and d.head[3].out_features == 5
    out = d([torch.randn(4, 16) for _ in range(3)])
    assert out.shape == (4, 5)
    with pytest.raises(ValueError, match="expected 3 tapped features"):
        d([torch.randn(4, 16)])


def test_per_sample_lm_loss_matches_manual():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), -100)
    labels[0, 3:] = torch.tensor([1, 2, 3])
    labels[1, 5] = 7
    per, n = per_sample_lm_loss(logits, labels)
    assert n.tolist() == [3, 1, 0]
    man0 = F.cross_entropy(logits[0, 2:5], labels[0, 3:6])
    man1 = F.cross_entropy(logits[1, 4:5], labels[1, 5:6])
    assert torch.allclose(per[:2], torch.stack([man0, man1]), atol=1e-6) and per[2] == 0
    tok = token_mean_lm_loss(logits, labels)
    assert torch.allclose(tok, (man0 * 3 + man1) / 4, atol=1e-6)


def test_reweight_loss_uses_weights_by_id():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[:, 2:] = torch.randint(0, 7, (2, 3))
    per, _ = per_sample_lm_loss(logits, labels)
    m = ReweightMethod({"a": 2.0, "b": 0.5})
    loss, logs = m.lm_loss(logits, {"labels": labels, "ids": ["a", "b"]})
    assert torch.allclose(loss, (2.0 * per[0] + 0.5 * per[1]) / 2)
    assert logs["lm_loss"] == pytest.approx(float(per.mean()))
    with pytest.raises(KeyError, match="no weight for sample id 'c'"):
        m.lm_loss(logits, {"labels": labels, "ids": ["a", "c"]})


def _adv(taps=(1, 2), fairness_lambda=1.0):
    cfg = types.SimpleNamespace(taps=list(taps), hidden=None, dropout=0.0, fairness_lambda=fairness_lambda,
                                ce_loss_weight=1.0, grl_start=0.1, grl_end=None, ramp_from_frac=0.01, ramp_to_frac=0.9,
                                loss_mode="balanced", token_mode="all")
    return AdversarialMethod(8, {"sex": 2}, cfg, total_steps=10, class_counts={"sex": torch.tensor([3.0, 1.0])})


def test_adversarial_discriminator_gets_only_its_own_ce_gradient():
    """Backbone features get the reversed gradient; the discriminator's own gradient is that of +CE."""
    torch.manual_seed(0)
    m = _adv()
    m.hidden_indices(4)
    h = {i: torch.randn(4, 5, 8, requires_grad=True) for i in (1, 2)}
    batch = {"attention_mask": torch.ones(4, 5, dtype=torch.long), "image_mask": torch.zeros(4, 5, dtype=torch.bool),
             "attr_labels": {"sex": torch.tensor([0, 1, 0, -100])}, "labels": torch.full((4, 5), -100)}
    logits = torch.zeros(4, 5, 3, requires_grad=True)
    out = m.compute(logits, h, batch, progress=0.5, step=5)
    strength = m.schedule(0.5)
    assert out.logs["grl_strength"] == pytest.approx(strength)
    out.loss.backward()
    disc_grads = [p.grad.clone() for p in m.module.parameters()]
    feat_grad = h[1].grad.clone()
    # Reference: plain CE (no reversal) on the same features.
    for p in m.module.parameters():
        p.grad = None
    h2 = {i: t.detach().clone().requires_grad_(True) for i, t in h.items()}
    feats = [masked_mean(h2[i], batch["attention_mask"].bool()) for i in (1, 2)]
    ce = F.cross_entropy(m.module["sex"](feats)[:3], torch.tensor([0, 1, 0]))
    ce.backward()
    for g, p in zip(disc_grads, m.module.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6), "discriminator must get exactly its own CE gradient"
    assert torch.allclose(feat_grad, -strength * h2[1].grad, atol=1e-6), "features must get the reversed gradient"
    assert out.logs["n_valid/sex"] == 3


def test_adversarial_taps_out_of_range():
    m = _adv(taps=(1, 9))
    with pytest.raises(ValueError, match=r"adversarial\.taps: \[9\] out of range"):
        m.hidden_indices(5)


def test_adversarial_pretraining_is_detached_and_uses_loss_mode():
    torch.manual_seed(0)
    m = _adv()
    m.hidden_indices(4)
    m.pretraining = True
    h = {i: torch.randn(4, 5, 8, requires_grad=True) for i in (1, 2)}
    batch = {"attention_mask": torch.ones(4, 5, dtype=torch.long), "image_mask": torch.zeros(4, 5, dtype=torch.bool),
             "attr_labels": {"sex": torch.tensor([0, 1, 0, 0])}}
    out = m.compute(None, h, batch, 0.0, 0)
    out.loss.backward()
    assert h[1].grad is None  # backbone frozen: features detached
    assert all(p.grad is not None for p in m.module.parameters())
    assert "grl_strength" not in out.logs


def test_optimizer_param_groups_give_heads_their_own_lr():
    from fairllava.regularizer import FairnessRegularizer
    from fairllava.training.config import OptimConfig
    from fairllava.training.methods import FairLLaVAMethod
    from fairllava.training.trainer import build_optimizer

    model = torch.nn.Linear(8, 8)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    model.add_module("frozen", frozen)
    reg = FairnessRegularizer({"attributes": {"sex": 2}, "dac_lr": 5e-3}, hidden_size=8)
    opt = build_optimizer(model, FairLLaVAMethod(reg, reg.cfg), OptimConfig(lr=1e-4, weight_decay=0.01))
    g_model, g_heads = opt.param_groups
    assert g_model["lr"] == 1e-4 and g_model["weight_decay"] == 0.01
    assert {id(p) for p in g_model["params"]} == {id(model.weight), id(model.bias)}  # frozen excluded
    assert g_heads["lr"] == 5e-3 and g_heads["weight_decay"] == 0.0
    assert {id(p) for p in g_heads["params"]} == {id(p) for p in reg.heads.parameters()}
    opt = build_optimizer(model, FairLLaVAMethod(reg, reg.cfg), OptimConfig(lr=1e-4, dac_lr=2e-2))
    assert opt.param_groups[1]["lr"] == 2e-2  # optim.dac_lr overrides fairness.dac_lr
    alt = FairnessRegularizer({"attributes": {"sex": 2}, "update_mode": "alternating"}, hidden_size=8)
    opt = build_optimizer(model, FairLLaVAMethod(alt, alt.cfg), OptimConfig(lr=1e-4))
    assert len(opt.param_groups) == 1  # alternating: heads have their own optimizer


def _tiny_batch():
    from fairllava.data.collator import VLMCollator
    from fairllava.models.tiny import build_tiny_llava
    from PIL import Image

    model, proc = build_tiny_llava(seed=0)
    col = VLMCollator(proc, {}, "train")
    img = Image.new("RGB", (32, 32), (120, 60, 30))
    items = [{"id": f"s{i}", "image": img, "conversations": [
        {"from": "human", "value": "<image>\n" + "describe it " * (i + 1)},
        {"from": "gpt", "value": "a finding " * (3 - i)}]} for i in range(3)]
    return model, col(items)


@pytest.mark.parametrize("method", ["lora", "reweight"])
def test_compact_logits_give_the_same_loss_and_gradients(method):
    """Logits only at target positions (lm_forward(compact=True)) change nothing the loss or the update sees."""
    from fairllava.training.methods import LoraMethod
    from fairllava.training.trainer import _BATCH_META, TrainingModule, accepts_logits_to_keep

    model, batch = _tiny_batch()
    assert accepts_logits_to_keep(model)
    lengths = (batch["labels"] != -100).sum(1)
    assert len(set(lengths.tolist())) > 1  # answers of different lengths at different positions
    m = LoraMethod() if method == "lora" else ReweightMethod({"s0": 0.5, "s1": 2.0, "s2": 1.0})
    results = []
    for compact in (False, True):
        module = TrainingModule(model, m, [], compact_logits=compact)
        assert module.compact_logits is compact
        model.zero_grad()
        loss, logs, _ = module(batch, 0.0, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys() and g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n
    # the compact forward really computes fewer logits
    inputs = {k: v for k, v in batch.items() if k not in _BATCH_META}
    from fairllava.training.trainer import lm_forward
    out, lab = lm_forward(model, inputs, batch["labels"], compact=True)
    assert out.logits.shape[1] == lab.shape[1] < batch["labels"].shape[1]


def test_compact_labels_alignment():
    from fairllava.training.methods import compact_labels, target_logit_positions

    labels = torch.tensor([[-100, -100, -100, 7, 8, -100],
                           [-100, -100, 5, 6, -100, -100]])
    pos = target_logit_positions(labels)
    assert pos.tolist() == [1, 2, 3, 5]  # positions followed by a target in some row, then the last
    lab = compact_labels(labels, pos)
    # after the shift, kept logit j pairs with labels[:, pos[j] + 1]
    assert lab[:, 1:].tolist() == [[-100, 7, 8], [5, 6, -100]]
    none = torch.full((2, 4), -100)
    assert target_logit_positions(none).tolist() == [3]
    assert compact_labels(none, target_logit_positions(none)).tolist() == [[-100], [-100]]


def test_models_without_logits_to_keep_get_full_logits():
    from fairllava.training.methods import LoraMethod
    from fairllava.training.trainer import TrainingModule

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids=None, use_cache=None):
            return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5, requires_grad=True))

    module = TrainingModule(NoKeep(), LoraMethod(), [], compact_logits=True)
    assert module.compact_logits is False
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.tensor([[-100, -100, 1, 2]] * 2)}
    loss, _, _ = module(batch, 0.0, 0)
    assert torch.isclose(loss, torch.log(torch.tensor(5.0)))
