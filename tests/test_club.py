"""club_mi: exact agreement with the explicit B×B CLUB estimate, edge cases, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from fairllava import club_mi

IGNORE = -100


def explicit_club(logits, labels, negatives="offdiag", ignore_index=IGNORE):
    """Reference: build L_ij = log q(y_j | z_i) over valid rows and average diagonal / off-diagonal."""
    valid = labels != ignore_index
    lp = F.log_softmax(logits.double()[valid], dim=-1)
    y = labels[valid]
    b = y.shape[0]
    if b < 2 or y.unique().numel() < 2:
        return (logits.double() * 0).sum()
    mat = lp[:, y]  # [B, B], mat[i, j] = log q(y_j | z_i)
    pos = mat.diagonal().mean()
    if negatives == "offdiag":
        neg = (mat.sum() - mat.diagonal().sum()) / (b * (b - 1))
    else:
        neg = mat.mean()
    return pos - neg


@pytest.mark.parametrize("negatives", ["offdiag", "full"])
def test_equals_explicit_bxb_value_and_gradient(negatives):
    g = torch.Generator().manual_seed(0)
    n_nonzero = 0
    for trial in range(200):
        b = int(torch.randint(1, 17, (1,), generator=g))
        k = int(torch.randint(2, 9, (1,), generator=g))
        logits = (3 * torch.randn(b, k, generator=g, dtype=torch.float64)).requires_grad_(True)
        # Draw labels from a subset of classes so some classes are absent; ignore some rows.
        present = torch.randperm(k, generator=g)[: int(torch.randint(1, k + 1, (1,), generator=g))]
        labels = present[torch.randint(0, len(present), (b,), generator=g)]
        labels[torch.rand(b, generator=g) < 0.25] = IGNORE
        fast = club_mi(logits, labels, negatives=negatives)
        ref = explicit_club(logits, labels, negatives)
        assert fast.dim() == 0 and torch.isfinite(fast)
        assert abs(fast.item() - ref.item()) < 1e-6, (trial, b, k, labels.tolist())
        (gf,) = torch.autograd.grad(fast, logits)
        ref_val = ref if ref.requires_grad else ref + 0 * logits.sum()
        (gr,) = torch.autograd.grad(ref_val, logits)
        assert torch.allclose(gf.double(), gr, atol=1e-6), (trial, b, k)
        n_nonzero += int(abs(float(ref)) > 1e-3)
    assert n_nonzero > 50  # the comparison is not vacuous


def test_constant_logits_give_zero():
    # q ignores z (same logits on every row): positive and negative average the same log q(y_j) -> exactly 0.
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 5, generator=g).expand(12, 5).clone().requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0])
    for neg in ("offdiag", "full"):
        mi = club_mi(logits, labels, negatives=neg)
        assert abs(float(mi)) < 1e-6, (neg, float(mi))


def test_uniform_logits_zero_both_modes():
    # q(k|z) uniform -> every log q equal -> positive == negative exactly, for both negative sets.
    logits = torch.zeros(9, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    for neg in ("offdiag", "full"):
        mi = club_mi(logits, labels, negatives=neg)
        assert abs(float(mi)) < 1e-7
        mi.backward()


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([1]),                      # B = 1
        torch.tensor([2, 2, 2, 2]),             # one class present
        torch.tensor([IGNORE, IGNORE, IGNORE]),  # nothing valid
        torch.tensor([IGNORE, 1, IGNORE]),      # one valid row
        torch.zeros(0, dtype=torch.long),       # empty batch
    ],
)
def test_degenerate_batches_are_differentiable_zero(labels):
    logits = torch.randn(labels.shape[0], 3, requires_grad=True)
    mi = club_mi(logits, labels)
    assert float(mi) == 0.0
    assert mi.requires_grad
    mi.backward()
    assert torch.all(logits.grad == 0) and torch.isfinite(logits.grad).all()


def test_ignored_rows_do_not_matter():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 4, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, IGNORE, 0, IGNORE, 1, 2, 3])
    mi = club_mi(logits, labels)
    keep = labels != IGNORE
    assert torch.allclose(mi, club_mi(logits[keep], labels[keep]), atol=1e-7)
    mi.backward()
    assert torch.all(logits.grad[~keep] == 0)


def test_fp32_computation_for_half_inputs():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 4, generator=g)
    labels = torch.randint(0, 4, (16,), generator=g)
    mi16 = club_mi(logits.to(torch.bfloat16), labels)
    assert mi16.dtype == torch.float32
    ref = explicit_club(logits.to(torch.bfloat16).float(), labels)
    assert abs(float(mi16) - float(ref)) < 1e-5


def test_separable_clusters_large_independent_near_zero():
    g = torch.Generator().manual_seed(3)
    n, k, d = 512, 4, 8
    y = torch.randint(0, k, (n,), generator=g)
    centers = 6 * torch.randn(k, d, generator=g)
    z_dep = centers[y] + torch.randn(n, d, generator=g)
    z_ind = torch.randn(n, d, generator=g)

    def fitted_estimate(z):
        head = torch.nn.Linear(d, k)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(head(z[: n // 2]), y[: n // 2]).backward()
            opt.step()
        with torch.no_grad():
            return float(club_mi(head(z[n // 2 :]), y[n // 2 :]))

    dep, ind = fitted_estimate(z_dep), fitted_estimate(z_ind)
    # Upper bound on I(y; z) <= H(y) = log 4 ≈ 1.39 nats for separable clusters it approaches that.
    assert dep > 1.0, dep
    assert abs(ind) < 0.05, ind


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), "logits must have shape"),
        (torch.randint(0, 3, (4, 3)), torch.zeros(4, dtype=torch.long), "floating-point"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), "labels must have shape"),
        (torch.randn(4, 3), torch.zeros(4), "integer tensor"),
        (torch.randn(4, 3), torch.tensor([0, 1, 3, 0]), r"labels\[2\] = 3 is out of range: expected 0..2"),
        (torch.randn(4, 3), torch.tensor([0, -1, 1, 0]), r"labels\[1\] = -1 is out of range"),
    ],
)
def test_bad_input_raises_value_error(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        club_mi(logits, labels)


def test_bad_negatives_mode():
    with pytest.raises(ValueError, match="negatives must be one of"):
        club_mi(torch.randn(3, 2), torch.tensor([0, 1, 0]), negatives="diag")


# ---------------------------------------------------------------- conditional (label-stratified) estimate
def _brute_conditional(logits, labels, strata, negatives="offdiag"):
    """sum_s n_s/N * CLUB_s with the explicit B_s x B_s matrix per stratum."""
    lp = torch.log_softmax(logits.double(), -1)
    total, acc = 0, 0.0
    for s in strata.unique().tolist():
        idx = (strata == s).nonzero().flatten()
        n = len(idx)
        if n < 2:
            continue
        L = lp[idx][:, labels[idx]]  # L_ij = log q(y_j | z_i)
        pos = L.diagonal().mean()
        neg = (L.sum() - L.diagonal().sum()) / (n * (n - 1)) if negatives == "offdiag" else L.mean()
        acc = acc + n * (pos - neg)
        total += n
    return acc / total if total else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("negatives", ["offdiag", "full"])
def test_conditional_club_matches_bruteforce(negatives):
    g = torch.Generator().manual_seed(7)
    for _ in range(100):
        B = int(torch.randint(1, 20, (1,), generator=g))
        K = int(torch.randint(2, 5, (1,), generator=g))
        S = int(torch.randint(1, 4, (1,), generator=g))
        logits = torch.randn(B, K, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, K, (B,), generator=g)
        strata = torch.randint(0, S, (B,), generator=g) * 3  # non-contiguous ids
        fast = club_mi(logits, labels, negatives, strata=strata)
        ref = _brute_conditional(logits, labels, strata, negatives)
        assert torch.allclose(fast, torch.as_tensor(ref, dtype=fast.dtype), atol=1e-9)
        if B >= 2 and torch.is_tensor(ref) and ref.requires_grad:
            g1, = torch.autograd.grad(fast, logits)
            g2, = torch.autograd.grad(ref, logits)
            assert torch.allclose(g1, g2, atol=1e-9)


def test_conditional_club_ignores_label_information():
    """z that encodes only the task label carries attribute info marginally, but none given the label."""
    g = torch.Generator().manual_seed(0)
    B = 4000
    y_task = torch.randint(0, 2, (B,), generator=g)
    # attribute correlated with the task label (a shortcut in the data)
    attr = torch.where(torch.rand(B, generator=g) < torch.where(y_task == 1, 0.85, 0.2), 1, 0)
    # a classifier that knows only y_task: q(a|z) = p(a|y)
    p1 = torch.where(y_task == 1, 0.85, 0.2)
    logits = torch.stack([torch.log(1 - p1), torch.log(p1)], 1)
    marginal = club_mi(logits, attr)
    conditional = club_mi(logits, attr, strata=y_task)
    assert marginal > 0.1
    assert abs(float(conditional)) < 0.01
    # a classifier that also sees the attribute itself is penalised in both forms
    leak = logits + 3.0 * torch.nn.functional.one_hot(attr, 2)
    assert club_mi(leak, attr, strata=y_task) > 0.1


def test_conditional_club_bad_strata():
    with pytest.raises(ValueError, match="strata"):
        club_mi(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), strata=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="strata"):
        club_mi(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), strata=torch.zeros(4))
