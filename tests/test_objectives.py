"""Sampled-token OPD against a float64 scalar-loop reference, gradients and masking."""

import math

import torch

from megatron_opd.objectives.sampled_token_opd import opd_advantages, sampled_token_opd_loss


def reference_loss(lp, mu, q, m, kl_coef, use_current, gamma, lo, hi):
    """Plain-Python float64 transcription of ALGORITHMS.md §1 + §6 (pi_old = mu)."""
    B, T = len(lp), len(lp[0])
    num, den = 0.0, 0.0
    for b in range(B):
        k = [((lp if use_current else mu)[b][t] - q[b][t]) * m[b][t] for t in range(T)]
        for t in range(T):
            if not m[b][t]:
                continue
            A = -kl_coef * sum(gamma ** (s - t) * k[s] for s in range(t, T)) if gamma > 0 \
                else -kl_coef * k[t]
            r = math.exp(lp[b][t] - mu[b][t])
            num += -min(r * A, min(max(r, 1 - lo), 1 + hi) * A)
            den += 1
    return num / max(den, 1.0)


def make(seed, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mu = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    q = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    m = (torch.rand(B, T, generator=g) > 0.3).to(torch.float64)
    return lp, mu, q, m


def test_matches_float64_reference():
    for seed, use_current, gamma in [(0, True, 0.0), (1, False, 0.0), (2, True, 0.7), (3, False, 0.9)]:
        lp, mu, q, m = make(seed)
        loss, _ = sampled_token_opd_loss(lp, mu, q, m, kl_coef=0.7,
                                         kl_logprobs="current" if use_current else "behaviour",
                                         discount=gamma, clip_eps_low=0.2, clip_eps_high=0.28)
        ref = reference_loss(lp.tolist(), mu.tolist(), q.tolist(), m.tolist(), 0.7, use_current,
                             gamma, 0.2, 0.28)
        assert abs(loss.item() - ref) < 1e-12, (seed, loss.item(), ref)


def test_gradient_matches_finite_differences():
    lp, mu, q, m = make(5)
    lp = lp.clone().requires_grad_(True)
    f = lambda x: sampled_token_opd_loss(x, mu, q, m, kl_logprobs="behaviour")[0]
    f(lp).backward()
    eps = 1e-6
    for idx in [(0, 0), (1, 3), (2, 5)]:
        plus, minus = lp.detach().clone(), lp.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (f(plus) - f(minus)).item() / (2 * eps)
        assert abs(fd - lp.grad[idx].item()) < 1e-6


def test_on_policy_gradient_is_reverse_kl_policy_gradient():
    # With pi_theta == mu (ratio 1, no clipping) the gradient w.r.t. log pi_t is m_t*lambda*k_t/N.
    lp, _, q, m = make(7)
    lp = lp.clone().requires_grad_(True)
    loss, _ = sampled_token_opd_loss(lp, lp.detach(), q, m, kl_coef=2.0)
    loss.backward()
    expected = 2.0 * (lp.detach() - q) * m / m.sum()
    assert torch.allclose(lp.grad, expected, atol=1e-12)


def test_masked_tokens_have_zero_loss_and_gradient():
    lp, mu, q, m = make(9)
    lp[m == 0] = float("nan")  # junk under the mask must not leak
    lp = lp.clone().requires_grad_(True)
    loss, _ = sampled_token_opd_loss(lp, mu, q, m)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(lp.grad[m == 0] == 0)
    lp2 = torch.zeros_like(lp, requires_grad=True)
    empty, metrics = sampled_token_opd_loss(lp2, mu, q, torch.zeros_like(m))
    empty.backward()
    assert empty.item() == 0.0 and torch.all(lp2.grad == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_discounted_advantages_closed_form():
    k = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    adv = opd_advantages(k, torch.zeros_like(k), torch.ones_like(k), kl_coef=1.0, discount=0.5)
    assert torch.allclose(adv, -torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0]], dtype=torch.float64))


def _reference_per_turn_mask(ids: list[int], mask: list[float], special: list[int]) -> list[float]:
    """Written by hand from the rule: walk the row; a turn starts where a trainable token
    follows an untrainable one (or the row starts); in each turn drop the first trainable
    occurrence of each special id."""
    out, seen, prev_live = list(mask), set(), False
    for t, (tok, m) in enumerate(zip(ids, mask)):
        live = m > 0
        if live and not prev_live:
            seen = set()  # a new assistant turn
        if live and tok in special and tok not in seen:
            seen.add(tok)
            out[t] = 0.0
        prev_live = live
    return out


def test_special_tokens_are_masked_once_per_assistant_turn():
    from megatron_opd.objectives.lsm import first_occurrence_mask

    # three turns (tool tokens between them are 0), padding at the end; 4 and 7 are special
    ids = [[4, 1, 4, 7, 9, 9, 7, 4, 4, 2, 5, 7, 0, 0],
           [1, 2, 3, 4, 4, 4, 7, 7, 0, 0, 0, 0, 0, 0]]
    mask = [[1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]
    got = first_occurrence_mask(torch.tensor(ids), torch.tensor(mask, dtype=torch.float32), [4, 7])
    want = [_reference_per_turn_mask(i, [float(x) for x in m], [4, 7]) for i, m in zip(ids, mask)]
    assert got.tolist() == want
    # spelled out for the first row: turn 1 loses t=0 (4) and t=3 (7), turn 2 t=6 (7) and t=7
    # (4), turn 3 t=11 (7); the second 4 of turn 1 (t=2) and of turn 2 (t=8) stay
    assert [t for t in range(14) if mask[0][t] and not got[0, t]] == [0, 3, 6, 7, 11]
    # single turn: the first occurrence per row, as before
    assert [t for t in range(14) if mask[1][t] and not got[1, t]] == [3, 6]
    # random rows against the reference (masks with holes: many turns)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (32, 40), generator=g)
    mask = (torch.rand(32, 40, generator=g) > 0.3).float()
    got = first_occurrence_mask(ids, mask, [1, 3])
    want = [_reference_per_turn_mask(i.tolist(), m.tolist(), [1, 3]) for i, m in zip(ids, mask)]
    assert got.tolist() == want
