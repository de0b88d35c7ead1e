"""f-OPD freshness control (megatron_opd/objectives/freshness.py) against closed forms written
out here with python floats (float64), one sample and one token at a time, sharing no code with
the module. Also: the loss mask stays binary in the objective (down-weighting reaches the loss
as a per-token weight of the policy-gradient terms, tested in tests/test_freshness_loss.py)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.objectives.freshness import (apply_freshness, context_lag, freshness_scores,
                                               rollout_drift, supervision_drift)

B, T = 5, 6
NAMES = ("offpolicy/freshness_mean", "offpolicy/freshness_dropped_fraction",
         "offpolicy/rollout_drift_mean", "offpolicy/supervision_drift_mean")


def _batch(seed: int = 0):
    """Log-probs with a different staleness per sample, a 0/1 mask with padding, a row without
    trainable tokens (row 3) and junk at masked positions."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    noise = torch.tensor([0.05, 0.4, 1.0, 0.2, 0.7], dtype=torch.float64)[:, None]
    mu = lp + noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[2, 0] = 0
    mask[3] = 0
    mask[4, :3] = 0
    mu = torch.where(mask > 0, mu, torch.full_like(mu, -math.inf))  # junk: must not leak
    return lp, mu, mask


def _py_drift(lp, mu, mask) -> list[float]:
    out = []
    for i in range(lp.shape[0]):
        vals = [abs(lp[i, t].item() - mu[i, t].item()) for t in range(lp.shape[1])
                if mask[i, t] > 0]
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return out


def _counts(mask) -> list[int]:
    return [int((mask[i] > 0).sum().item()) for i in range(mask.shape[0])]


def test_rollout_drift_closed_form_and_detached():
    lp, mu, mask = _batch()
    lp = lp.requires_grad_(True)
    got = rollout_drift(lp, mu, mask)
    assert not got.requires_grad  # a weight, never a gradient path
    torch.testing.assert_close(got, torch.tensor(_py_drift(lp.detach(), mu, mask),
                                                 dtype=torch.float64), rtol=1e-12, atol=0)
    assert got[3] == 0 and (got[[0, 1, 2, 4]] > 0).all()
    # float32 behaviour log-probs (as the fleet sends them) promote, not truncate
    assert rollout_drift(lp, mu.float(), mask).dtype == torch.float64


def test_context_lag_and_supervision_drift():
    versions = torch.tensor([[5, 5, 6, -1], [9, 9, 9, 9], [2, 4, 6, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    changed = torch.tensor([False, True, True])
    got = context_lag(versions, mask, learner_version=10, revision_changed=changed)
    # row 0: lags 5, 5, 4 -> 14/3; row 1: no tokens -> 0 (+1 revision); row 2: 8, 4, 2 -> 14/3 + 1
    torch.testing.assert_close(got, torch.tensor([14 / 3, 1.0, 14 / 3 + 1], dtype=torch.float64))
    torch.testing.assert_close(supervision_drift(got), got)
    # a context newer than the learner (clock skew between counters) is not negative staleness
    assert supervision_drift(torch.tensor([-2.0, 3.0])).tolist() == [0.0, 3.0]


def test_freshness_scores_closed_form():
    d_roll = torch.tensor([0.0, 0.3, 1.7, 0.0], dtype=torch.float64)
    d_sup = torch.tensor([0.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    got = freshness_scores(d_roll, d_sup, alpha=1.5, beta=0.25)
    want = [math.exp(-1.5 * a - 0.25 * s) for a, s in zip(d_roll.tolist(), d_sup.tolist())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    assert got[0] == 1.0
    assert (freshness_scores(d_roll, d_sup, 0.0, 0.0) == 1).all()  # alpha = beta = 0: all fresh
    with pytest.raises(ValueError):
        freshness_scores(d_roll, d_sup, -1.0, 0.0)


def _metrics_ref(mask, f, d_roll, d_sup, kept) -> dict[str, float]:
    n = _counts(mask)
    has = [i for i in range(len(n)) if n[i] > 0]
    total = sum(n)
    return {
        "offpolicy/freshness_mean": sum(f[i] for i in has) / len(has),
        "offpolicy/freshness_dropped_fraction": sum(n[i] for i in has if i not in kept) / total,
        "offpolicy/rollout_drift_mean": sum(n[i] * d_roll[i] for i in has) / total,
        "offpolicy/supervision_drift_mean": sum(d_sup[i] for i in has) / len(has),
    }


def _inputs():
    lp, mu, mask = _batch()
    d_roll = rollout_drift(lp, mu, mask)
    d_sup = torch.tensor([0.0, 1.0, 3.0, 7.0, 2.0], dtype=torch.float64)
    f = freshness_scores(d_roll, d_sup, alpha=1.0, beta=0.25)
    return mask, f, d_roll, d_sup


def _check_metrics(m, ref):
    assert set(m) == set(NAMES)
    for k in NAMES:
        assert m[k].item() == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k


def test_accept_leaves_the_mask_alone():
    mask, f, d_roll, d_sup = _inputs()
    new, m = apply_freshness(mask, f, d_roll, "accept", f_min=0.9, drift_budget=0.0, d_sup=d_sup)
    assert torch.equal(new, mask)
    kept = [i for i, c in enumerate(_counts(mask)) if c > 0]
    _check_metrics(m, _metrics_ref(mask, f.tolist(), d_roll.tolist(), d_sup.tolist(), kept))
    assert m["offpolicy/freshness_dropped_fraction"] == 0


def test_drop_zeros_exactly_the_stale_rows():
    mask, f, d_roll, d_sup = _inputs()
    fl = f.tolist()
    f_min = sorted(fl)[2]  # a threshold that keeps some rows and drops others
    new, m = apply_freshness(mask, f, d_roll, "drop", f_min=f_min, drift_budget=0.0, d_sup=d_sup)
    kept = [i for i in range(B) if fl[i] >= f_min and _counts(mask)[i] > 0]
    dropped = [i for i in range(B) if fl[i] < f_min]
    assert kept and [i for i in dropped if _counts(mask)[i] > 0]
    for i in range(B):
        assert torch.equal(new[i], mask[i] if i in kept else torch.zeros(T, dtype=new.dtype))
    _check_metrics(m, _metrics_ref(mask, fl, d_roll.tolist(), d_sup.tolist(), kept))
    assert 0 < m["offpolicy/freshness_dropped_fraction"] < 1


def test_downweight_weights_and_normalisation():
    """Per-sample weight w_i = f_i / mean f; the weighted mask sums to the token count, so the
    mask's token mean of any x is sum_i w_i * sum_t x / sum_i w_i * n_i."""
    mask, f, d_roll, d_sup = _inputs()
    new, m = apply_freshness(mask, f, d_roll, "downweight", f_min=0.99, drift_budget=0.0,
                             d_sup=d_sup)
    n, fl = _counts(mask), f.tolist()
    has = [i for i in range(B) if n[i] > 0]
    mean_f = sum(fl[i] for i in has) / len(has)
    w = [fl[i] / mean_f if n[i] else 0.0 for i in range(B)]
    scale = sum(n) / sum(w[i] * n[i] for i in range(B))  # renormalise to the token count
    for i in range(B):
        for t in range(T):
            want = w[i] * scale if mask[i, t] > 0 else 0.0
            assert new[i, t].item() == pytest.approx(want, rel=1e-12, abs=0)
    assert new.sum().item() == pytest.approx(sum(n), rel=1e-13)
    # weights differ (the rows are not equally fresh) and f_min does not drop anything here
    assert max(w) / min(w[i] for i in has) > 1.2
    _check_metrics(m, _metrics_ref(mask, fl, d_roll.tolist(), d_sup.tolist(), has))
    # the learner's token mean over the new mask is the f-weighted mean
    x = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    token_mean = (x * new).sum() / new.sum()
    num = sum(w[i] * x[i, t].item() for i in range(B) for t in range(T) if mask[i, t] > 0)
    den = sum(w[i] * n[i] for i in range(B))
    assert token_mean.item() == pytest.approx(num / den, rel=1e-12)


def test_drift_budget_drops_the_stalest_until_within_budget():
    mask, f, d_roll, d_sup = _inputs()
    n, dl = _counts(mask), d_roll.tolist()
    has = [i for i in range(B) if n[i] > 0]

    def tmean(ids):
        return sum(n[i] * dl[i] for i in ids) / sum(n[i] for i in ids) if ids else 0.0
    by_drift = sorted(has, key=lambda i: -dl[i])
    # a budget just below the mean without the stalest: the two stalest must go, no more
    budget = 0.5 * (tmean(by_drift[1:]) + tmean(by_drift[2:]))
    assert tmean(by_drift[2:]) <= budget < tmean(by_drift[1:])
    for policy in ("accept", "drop", "downweight"):
        new, m = apply_freshness(mask, f, d_roll, policy, f_min=0.0, drift_budget=budget,
                                 d_sup=d_sup)
        kept = by_drift[2:]
        for i in range(B):
            assert (new[i] > 0).any().item() == (i in kept), (policy, i)
        assert tmean(kept) <= budget
        _check_metrics(m, _metrics_ref(mask, f.tolist(), dl, d_sup.tolist(), kept))
        assert new.sum().item() == pytest.approx(sum(n[i] for i in kept), rel=1e-12)
    # a budget every sample already meets drops nothing; 0 is off
    for budget in (max(dl) + 1, 0.0):
        new, _ = apply_freshness(mask, f, d_roll, "accept", 0.0, budget)
        assert torch.equal(new, mask)


def test_drift_budget_after_drop_policy_and_ties():
    # two equally stale rows: the lower index leaves first, and one removal is enough
    mask = torch.ones(3, 2, dtype=torch.float64)
    d_roll = torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64)
    f = torch.tensor([0.9, 0.9, 0.1], dtype=torch.float64)
    # (exact binary fractions: a mean exactly at the budget is within it)
    new, _ = apply_freshness(mask, f, d_roll, "accept", 0.0, drift_budget=0.625)
    assert new.sum(-1).tolist() == [0.0, 2.0, 2.0]  # mean (1 + 0.25) / 2 = 0.625 <= 0.625
    # "drop" removes row 2 (f < 0.5) first; the budget then sees rows 0, 1 (mean 1.0 > 0.625)
    new, m = apply_freshness(mask, f, d_roll, "drop", 0.5, drift_budget=0.625)
    assert new.sum().item() == 0.0
    assert m["offpolicy/freshness_dropped_fraction"].item() == 1.0


def test_empty_and_all_masked_batches_are_finite():
    for b in (0, 3):
        mask = torch.zeros(b, T)
        junk = torch.full((b,), math.nan)
        for policy in ("accept", "drop", "downweight"):
            new, m = apply_freshness(mask, junk, junk, policy, 0.5, 0.1, d_sup=junk)
            assert new.shape == (b, T) and (new == 0).all()
            assert set(m) == set(NAMES)
            assert all(v.item() == 0.0 for v in m.values()), (b, policy, m)
        assert rollout_drift(torch.zeros(b, T), torch.full((b, T), -math.inf), mask).tolist() \
            == [0.0] * b


def test_downweight_with_underflowed_scores_is_finite():
    # every f is 0 (exp underflow at huge alpha): no information, all weights stay 1
    mask = torch.ones(2, 3)
    f = freshness_scores(torch.tensor([900.0, 1000.0]), torch.zeros(2), 1.0, 0.0)
    assert (f == 0).all()
    new, m = apply_freshness(mask, f, torch.tensor([900.0, 1000.0]), "downweight", 0.5, 0.0)
    assert torch.equal(new, mask) and all(torch.isfinite(v) for v in m.values())


def test_supervision_metric_only_with_d_sup_and_bad_policy():
    mask, f, d_roll, _ = _inputs()
    _, m = apply_freshness(mask, f, d_roll, "accept", 0.5, 0.0)
    assert "offpolicy/supervision_drift_mean" not in m
    with pytest.raises(ValueError):
        apply_freshness(mask, f, d_roll, "reject", 0.5, 0.0)


# --- fractional mask weights in the objective --------------------------------------------------

def _opd_batch():
    """One-token-per-position OPD inputs at ratio 1 (mu = pi), kl from the current policy, so the
    per-token loss of sampled-token OPD is exactly k_t = log pi - log q (no clipping at r = 1)."""
    g = torch.Generator().manual_seed(4)
    lp = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    q = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)[:, None].expand(3, 4).clone()
    w[1, 3] = 0.0
    want = (w * (lp - q)).sum() / w.sum()
    unweighted = ((w > 0) * (lp - q)).sum() / (w > 0).sum()
    assert abs(want - unweighted) > 1e-3  # weights that change the answer
    return lp, q, w, want


def test_fractional_mask_weights_the_policy_gradient_mean():
    from megatron_opd.objectives.policy_gradient import clipped_policy_gradient

    lp, q, w, want = _opd_batch()
    loss, _ = clipped_policy_gradient(lp, lp, -(lp - q), w, 0.2, 0.28)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)


def test_the_loss_mask_is_binary_and_weights_travel_separately():
    """By contract the loss mask says which tokens train (objective_loss binarises it: a
    fractional mask gives the plain token mean); freshness weights reach the loss as the
    policy-gradient terms' per-token weight instead (tests/test_freshness_loss.py)."""
    from megatron_opd.config import ObjectiveConfig
    from megatron_opd.objectives.compose import ObjectiveInputs, objective_loss

    lp, q, w, want = _opd_batch()

    def loss_with(mask):
        inp = ObjectiveInputs(mask=mask, response_ids=torch.zeros(3, 4, dtype=torch.long),
                              logprobs=lp, behaviour_logprobs=lp, teacher_logprobs=q)
        return objective_loss(inp, ObjectiveConfig(terms=["sampled_token_opd"]))[0]

    torch.testing.assert_close(loss_with(w), loss_with((w > 0).to(w.dtype)), rtol=0, atol=0)
    assert not torch.allclose(loss_with(w), want)  # the weighted mean is not what it computes
