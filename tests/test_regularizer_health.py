"""DAC health (held-out prequential balanced accuracy, dead-DAC check), held-out heads in alternating mode, and the
separate penalty gradient budget."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from fairllava import FairnessConfig, FairnessRegularizer, club_mi
from fairllava.errors import FairllavaError
from fairllava.regularizer.budget import PenaltyBudget
from fairllava.regularizer.config import RECOMMENDED_ESTIMATOR
from fairllava.regularizer.health import DeadDACError, DeadDACWarning

WARMUP = 50


def _states(b, t, step, d=32, p_minority=0.3):
    """LM-like image-token states: two huge outlier dimensions, the attribute weakly in one small dimension."""
    g = torch.Generator().manual_seed(1000 + step)
    a = (torch.rand(b, generator=g) < p_minority).long()
    h = torch.randn(b, t, d, generator=g)
    h[:, :, 0] = 300.0 + 40.0 * torch.randn(b, t, generator=g)
    h[:, :, 1] = -150.0 + 25.0 * torch.randn(b, t, generator=g)
    h[:, :, 5] += 1.5 * (2 * a[:, None] - 1)
    return h, a


def _run(steps=WARMUP + 1, **kw):
    """Joint-mode training of the heads only (frozen states), as in the first steps of a run; returns logs per step."""
    cfg = dict(attributes={"race": {"num_classes": 2, "weight": 1.0}}, dac_health_warmup_steps=WARMUP,
               dac_health_window=256, seed=0)
    cfg.update(kw)
    torch.manual_seed(0)
    reg = FairnessRegularizer(FairnessConfig(**cfg), hidden_size=32)
    lr = cfg.get("dac_lr") or 1e-4  # null = the LoRA lr of the paper presets
    opt = torch.optim.AdamW(reg.param_groups(1e-4), weight_decay=0.0)
    assert opt.param_groups[0]["lr"] == lr
    rows = []
    for step in range(steps):
        h, a = _states(8, 16, step)
        out = reg([h], torch.ones(8, 16, dtype=torch.bool), {"race": a}, step=step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        rows.append(out["logs"])
    return reg, rows


PAPER = {}  # random_token, L2-normalised (auto), dac_lr null = the LoRA lr
RECOMMENDED = dict(RECOMMENDED_ESTIMATOR)  # standardised z, dac_lr 1e-2, every image token, other-sample negatives


def test_dead_dac_warning_fires_under_the_papers_literal_settings():
    with pytest.warns(DeadDACWarning, match=r"DEAD DAC .*race .*L2 normalisation.*dac_lr: null.*random_token"):
        reg, rows = _run(**PAPER)
    assert rows[-1]["dac_bacc/race"] < 0.55
    assert int(reg.health.checked) == 1
    with warnings.catch_warnings():  # once only
        warnings.simplefilter("error", DeadDACWarning)
        h, a = _states(8, 16, 99)
        reg([h], torch.ones(8, 16, dtype=torch.bool), {"race": a}, step=WARMUP + 5)


def test_recommended_settings_learn_within_the_warmup_and_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadDACWarning)
        reg, rows = _run(**RECOMMENDED)
    assert rows[WARMUP]["dac_bacc/race"] >= 0.75, rows[WARMUP]["dac_bacc/race"]
    assert int(reg.health.checked) == 1
    # the plain per-batch accuracy of a dead DAC sits at the majority share; the balanced one at chance
    _, dead = _run(**PAPER, on_dead_dac="ignore")
    assert dead[-1]["dac_bacc/race"] < 0.55 <= max(r["dac_acc/race"] for r in dead[-10:])


def test_dead_dac_error_and_ignore():
    with pytest.raises(DeadDACError, match=r"fairness\.on_dead_dac=error") as e:
        _run(**PAPER, on_dead_dac="error")
    assert isinstance(e.value, FairllavaError) and "\n" not in str(e.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadDACWarning)
        _run(**PAPER, on_dead_dac="ignore")
    with pytest.raises(FairllavaError, match="on_dead_dac"):
        FairnessConfig(on_dead_dac="loud")


def test_health_window_is_prequential_and_checkpointed():
    reg = FairnessRegularizer(FairnessConfig(attributes={"race": 2}, mi_pooling="token", dac_health_window=4),
                              hidden_size=3)
    with torch.no_grad():
        reg.heads["race"].weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
        reg.heads["race"].bias.zero_()
    h = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]], [[-1.0, 0, 0], [-1.0, 0, 0]], [[1.0, 0, 0], [1.0, 0, 0]]])
    out = reg([h], torch.ones(3, 2, dtype=torch.bool), {"race": torch.tensor([0, 1, 1])}, step=0)
    # one entry per sample (not per token), scored by the heads as they were before this batch's update
    assert int(reg.health.seen) == 3 and reg.health.pred[:3, 0].tolist() == [0, 1, 0]
    assert abs(out["logs"]["dac_bacc/race"] - 0.75) < 1e-6  # recall 1.0 (class 0) and 0.5 (class 1)
    other = FairnessRegularizer(FairnessConfig(attributes={"race": 2}, mi_pooling="token", dac_health_window=4),
                                hidden_size=3)
    other.health._checked = True  # a stale mirror must not survive loading a checkpoint
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.health.pred, reg.health.pred) and int(other.health.seen) == 3
    assert other.health._checked is None and other.health._seen is None


def test_alternating_held_out_heads_score_the_batch_they_were_not_fitted_on():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 3, 6, generator=g, requires_grad=True)
    lab = {"race": torch.randint(0, 3, (8,), generator=g)}
    mask = torch.ones(8, 3, dtype=torch.bool)
    for mode in ("same_batch", "held_out"):
        torch.manual_seed(0)
        reg = FairnessRegularizer(FairnessConfig(attributes={"race": 3}, update_mode="alternating", n_dac_steps=5,
                                                 mi_pooling="token", alternating_penalty_heads=mode), hidden_size=6)
        opt = torch.optim.Adam(reg.param_groups(0.1))
        before = {k: v.detach().clone() for k, v in reg.heads["race"].named_parameters()}
        z, rows = reg.pool([h], mask)
        reg.dac_update(z.detach(), lab, opt, row_index=rows)
        out = reg.penalty(z, lab, row_index=rows)
        w = before if mode == "held_out" else {k: v.detach() for k, v in reg.heads["race"].named_parameters()}
        ref = club_mi(z.detach() @ w["weight"].T + w["bias"], lab["race"][rows])
        assert abs(out["logs"]["mi/race"] - ref.item()) < 1e-6, mode
        h.grad = None
        out["loss"].backward()  # the snapshot survives the in-place head updates
        assert h.grad is not None and h.grad.abs().sum() > 0
        if mode == "same_batch":
            fitted = out["logs"]["mi/race"]
        else:
            assert out["logs"]["mi/race"] < fitted  # heads fitted on the batch overstate the estimate


# ----------------------------------------------------------------------------------------- penalty budget
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.low = nn.Linear(4, 8)   # below the tap: gets LM and penalty gradients
        self.high = nn.Linear(8, 1)  # above the tap: LM only

    def losses(self, x):
        h = torch.tanh(self.low(x))
        lm = self.high(h).pow(2).mean()
        penalty = 50.0 * h[:, 0].mean()  # a penalty whose gradient dwarfs the LM's, as measured on the demo model
        return lm, penalty


def _grads(net):
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in net.parameters()]


def test_separate_budget_does_not_shrink_the_lm_update():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    # LM alone, clipped to 1.0: the update the LM term should get whatever the penalty does
    net = _Net()
    lm, _ = net.losses(x)
    lm.backward()
    torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0)
    lm_only = _grads(net)
    # penalty alone, for the expected scaled contribution
    net = _Net()
    _, pen = net.losses(x)
    pen.backward()
    pen_only = _grads(net)
    pen_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in pen_only])))
    assert pen_norm > 10  # the regime where joint clipping hurts
    # separate budget: penalty clipped to 0.5, LM to 1.0, summed
    net = _Net()
    budget = PenaltyBudget(net.parameters(), [], clip=0.5, ratio=None)
    lm, pen = net.losses(x)
    budget.accumulate(pen)
    lm.backward()
    logs = budget.apply(1.0)
    assert abs(logs["penalty_grad_norm"] - pen_norm) < 1e-4
    scale = logs["penalty_grad_scale"]
    assert abs(scale * pen_norm - 0.5) < 1e-4
    for got, a, b in zip(_grads(net), lm_only, pen_only):
        assert torch.allclose(got, a + scale * b, atol=1e-6)  # the LM part is exactly the LM-only clipped update
    # joint clipping (today's default) shrinks the LM part by the penalty's share of the norm
    net = _Net()
    lm, pen = net.losses(x)
    (lm + pen).backward()
    joint_norm = float(torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0))
    g_high = net.high.weight.grad  # above the tap only the LM contributes: shrunk by ~1/joint_norm
    assert joint_norm > 10 and float(g_high.norm()) < 0.2 * float(lm_only[2].norm())


def test_ratio_budget_and_config():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    net = _Net()
    budget = PenaltyBudget(net.parameters(), [], clip=None, ratio=0.25)
    lm, pen = net.losses(x)
    budget.accumulate(pen)
    lm.backward()
    logs = budget.apply(0.0)  # no LM clipping: the ratio is against the raw LM norm
    assert abs(logs["penalty_grad_norm"] * logs["penalty_grad_scale"] - 0.25 * logs["grad_norm"]) < 1e-5
    cfg = FairnessConfig(penalty_grad_clip=1.0)
    assert cfg.separate_penalty_budget and not FairnessConfig().separate_penalty_budget
    with pytest.raises(FairllavaError, match="penalty_grad_ratio"):
        FairnessConfig(penalty_grad_ratio=0)
