"""Better CLUB negatives: other-sample pairs, the label queue, single-group strata — each equal to brute force.

Brute force = explicit loops over (anchor, partner) pairs in float64: per stratum the mean over pairs of
log q(y_i|z_i) - log q(y_j|z_i), strata weighted by their eligible anchors (club.py ``_anchor_club``).
"""
import pytest
import torch
import torch.nn.functional as F

from fairllava import FairnessConfig, FairnessRegularizer, club_mi
from fairllava.errors import FairllavaError

IGN = -100


def brute(logits, labels, negatives="offdiag", strata=None, groups=None, plab=None, pstr=None, skip=False):
    lp = F.log_softmax(logits.double(), dim=-1)
    n = labels.shape[0]
    s = strata if strata is not None else torch.zeros(n, dtype=torch.long)
    g = groups if groups is not None else torch.arange(n)
    anchors = [i for i in range(n) if labels[i] != IGN and s[i] != IGN]
    queue = []
    if plab is not None:
        ps = pstr if pstr is not None else torch.zeros(plab.shape[0], dtype=torch.long)
        queue = [(int(plab[j]), int(ps[j])) for j in range(plab.shape[0]) if plab[j] != IGN and ps[j] != IGN]
    per_stratum: dict[int, list] = {}
    for i in anchors:
        pool_a = [j for j in anchors if s[j] == s[i]]
        pool_q = [y for y, st in queue if st == int(s[i])]
        if len(pool_a) + len(pool_q) < 2:
            continue
        classes = {int(labels[j]) for j in pool_a} | set(pool_q)
        if skip and len(classes) < 2:
            continue
        if negatives == "full":
            part = pool_a
        elif negatives == "other_samples":
            part = [j for j in pool_a if g[j] != g[i]]
        else:
            part = [j for j in pool_a if j != i]
        ys = [int(labels[j]) for j in part] + pool_q
        if ys:  # one entry per (anchor, partner) pair
            per_stratum.setdefault(int(s[i]), []).append(torch.stack([lp[i, labels[i]] - lp[i, y] for y in ys]))
    if not per_stratum:
        return (logits.double() * 0).sum()
    n_anchors = torch.tensor([len(v) for v in per_stratum.values()], dtype=torch.float64)
    mi_s = torch.stack([torch.cat(v).mean() for v in per_stratum.values()])
    return (n_anchors * mi_s).sum() / n_anchors.sum()


def _case(g, with_strata, with_groups, with_queue):
    n_samples = int(torch.randint(1, 7, (1,), generator=g))
    k = int(torch.randint(2, 5, (1,), generator=g))
    if with_groups:  # token pooling: each sample contributes 1..4 rows sharing its label and stratum
        sizes = torch.randint(1, 5, (n_samples,), generator=g)
        groups = torch.repeat_interleave(torch.arange(n_samples), sizes)
    else:
        groups = torch.arange(n_samples)
    lab_s = torch.randint(0, k, (n_samples,), generator=g)
    lab_s[torch.rand(n_samples, generator=g) < 0.15] = IGN
    labels = lab_s[groups]
    strata = None
    if with_strata:
        st = torch.randint(0, 3, (n_samples,), generator=g)
        st[torch.rand(n_samples, generator=g) < 0.1] = IGN
        strata = st[groups]
    n = labels.shape[0]
    logits = (2 * torch.randn(n, k, generator=g, dtype=torch.float64)).requires_grad_(True)
    plab = pstr = None
    if with_queue:
        m = int(torch.randint(0, 12, (1,), generator=g))
        plab = torch.randint(0, k, (m,), generator=g)
        plab[torch.rand(m, generator=g) < 0.2] = IGN
        if with_strata:
            pstr = torch.randint(0, 3, (m,), generator=g)
            pstr[torch.rand(m, generator=g) < 0.1] = IGN
    return logits, labels, strata, groups if with_groups else None, plab, pstr


@pytest.mark.parametrize("negatives", ["offdiag", "full", "other_samples"])
@pytest.mark.parametrize("with_strata", [False, True], ids=["marginal", "conditional"])
@pytest.mark.parametrize("with_queue", [False, True], ids=["batch", "queue"])
@pytest.mark.parametrize("skip", [False, True], ids=["all_strata", "skip_single"])
def test_anchor_form_equals_brute_force(negatives, with_strata, with_queue, skip):
    g = torch.Generator().manual_seed(hash((negatives, with_strata, with_queue, skip)) % 1000)
    nonzero = 0
    for _ in range(60):
        logits, labels, strata, groups, plab, pstr = _case(g, with_strata, negatives == "other_samples", with_queue)
        fast = club_mi(logits, labels, negatives, IGN, strata=strata, groups=groups, partner_labels=plab,
                       partner_strata=pstr, skip_single_group_strata=skip)
        ref = brute(logits, labels, negatives, strata, groups, plab, pstr, skip)
        assert torch.isfinite(fast) and abs(fast.item() - ref.item()) < 1e-6, (labels, strata, groups, plab)
        (gf,) = torch.autograd.grad(fast, logits, allow_unused=True)
        gf = torch.zeros_like(logits) if gf is None else gf
        (gr,) = torch.autograd.grad(ref + 0 * logits.sum(), logits)
        assert torch.allclose(gf, gr, atol=1e-6)
        nonzero += abs(float(ref)) > 1e-3
    assert nonzero > 15  # not vacuous


@pytest.mark.parametrize("negatives", ["offdiag", "full"])
def test_anchor_form_equals_todays_form_without_new_options(negatives):
    """With no groups, no queue and no skipping, the anchor form is the reference estimate (marginal and conditional)."""
    from fairllava.regularizer.club import _anchor_club

    g = torch.Generator().manual_seed(7)
    for _ in range(100):
        logits, labels, strata, _, _, _ = _case(g, bool(torch.rand(1, generator=g) < 0.5), False, False)
        old = club_mi(logits, labels, negatives, IGN, strata=strata)
        new = _anchor_club(logits, labels, strata, negatives, IGN, None, None, None, False)
        assert abs(float(old) - float(new)) < 1e-9


def test_other_samples_removes_the_own_sample_block():
    # Two samples x 3 tokens; q reads the sample perfectly. Own tokens among the negatives shrink the estimate.
    logits = torch.tensor([[4.0, -4.0]] * 3 + [[-4.0, 4.0]] * 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    today = float(club_mi(logits, labels))  # 2 of every anchor's 5 partners are its own sample's tokens
    other = float(club_mi(logits, labels, "other_samples", groups=groups))
    lp = F.log_softmax(logits, -1)
    assert abs(other - float(lp[0, 0] - lp[0, 1])) < 1e-9  # partners are exactly the other sample's tokens
    assert abs(today - 0.6 * other) < 1e-9
    # q that ignores z gives exactly 0 even with unequal token counts per sample
    const = torch.tensor([[0.3, -0.2]]).expand(7, 2)
    assert abs(float(club_mi(const, torch.tensor([0, 0, 0, 1, 1, 0, 1]), "other_samples",
                             groups=torch.tensor([0, 0, 0, 1, 1, 2, 3])))) < 1e-7


def test_single_group_strata_carry_no_weight():
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0, 0, 0])
    strata = torch.tensor([0, 0, 0, 1, 1, 1])  # stratum 1 has only class 0: its estimate is exactly 0
    diluted = float(club_mi(logits, labels, strata=strata))
    kept = float(club_mi(logits, labels, strata=strata, skip_single_group_strata=True))
    only0 = float(club_mi(logits[:3], labels[:3]))
    assert abs(kept - only0) < 1e-9 and abs(diluted - 0.5 * only0) < 1e-9
    # all strata single-group: the estimate is an exact 0 (no NaN)
    assert float(club_mi(logits, torch.zeros(6, dtype=torch.long), strata=strata, skip_single_group_strata=True)) == 0.0


def _reg(**kw):
    cfg = dict(attributes={"race": {"num_classes": 3, "weight": 1.0}}, mi_pooling="token", mi_penalty="signed")
    cfg.update(kw)
    return FairnessRegularizer(FairnessConfig(**cfg), hidden_size=6)


def test_regularizer_queue_feeds_past_labels_as_negatives():
    torch.manual_seed(0)
    reg = _reg(queue_size=10, negatives="other_samples", mi_conditional=True, mi_skip_single_group_strata=True)
    seen_y, seen_s = [], []
    for t in range(4):
        h = torch.randn(3, 4, 6)
        mask = torch.rand(3, 4) < 0.7
        mask[:, 0] = True
        y = torch.randint(0, 3, (3,))
        s = torch.randint(0, 2, (3,))
        out = reg([h], mask, {"race": y}, step=t, strata=s)
        z, rows = reg.pool([h], mask)  # the same rows (token pooling without a cap draws no random numbers)
        logits = reg.heads["race"](z)
        qy = torch.cat(seen_y)[-10:] if seen_y else None
        qs = torch.cat(seen_s)[-10:] if seen_s else None
        ref = brute(logits.detach(), y[rows], "other_samples", s[rows], rows, qy, qs, skip=True)
        assert abs(out["logs"]["mi/race"] - float(ref)) < 1e-6, t
        seen_y.append(y[rows])
        seen_s.append(s[rows])
    assert int(reg.queue.seen) == sum(len(v) for v in seen_y)
    # the queue and its pointer are buffers: checkpointed and restored with the regulariser
    other = _reg(queue_size=10, negatives="other_samples", mi_conditional=True, mi_skip_single_group_strata=True)
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.queue.labels, reg.queue.labels) and int(other.queue.seen) == int(reg.queue.seen)
    # eval mode never pushes
    reg.eval()
    before = int(reg.queue.seen)
    reg([h], mask, {"race": y}, step=9, strata=s)
    assert int(reg.queue.seen) == before


def test_queue_size_bound_is_a_one_line_error():
    with pytest.raises(FairllavaError, match=r"queue_size=1000000000 would need .* MiB .*use at most"):
        FairnessConfig(queue_size=10**9)
    with pytest.raises(FairllavaError, match="queue_size"):
        FairnessConfig(queue_size=-1)
