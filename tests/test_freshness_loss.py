"""Freshness control inside the objective (objectives/compose.py): down-weighting scales each
sample's policy-gradient tokens by f_i N / sum_j n_j f_j, dropping removes samples from every
term; checked against an explicit float64 reference of the §1 + §6 loss."""

from __future__ import annotations

import math

import torch

from megatron_opd.config import CorrectionConfig, ObjectiveConfig
from megatron_opd.objectives.compose import ObjectiveInputs, objective_loss

B, T = 3, 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mu = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    q = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[2, 3:] = 0
    lag = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    return ObjectiveInputs(mask=mask, response_ids=torch.zeros(B, T, dtype=torch.long),
                           logprobs=lp, behaviour_logprobs=mu, teacher_logprobs=q,
                           context_lag=lag)


def _reference(inp, keep_rows, weights, eps_low=0.2, eps_high=0.28):
    """sum over kept tokens of w_i * -min(r A, clip(r) A) / kept tokens, by loops."""
    total, n = 0.0, 0
    lp = inp.logprobs
    for i in range(B):
        if i not in keep_rows:
            continue
        for t in range(T):
            if inp.mask[i, t] == 0:
                continue
            a = -(lp[i, t].detach() - inp.teacher_logprobs[i, t])
            r = torch.exp(lp[i, t] - inp.behaviour_logprobs[i, t])
            rc = torch.clamp(r, 1 - eps_low, 1 + eps_high)
            total = total + weights[i] * -torch.minimum(r * a, rc * a)
            n += 1
    return total / n


def _scores(inp, alpha, beta):
    f = []
    for i in range(B):
        live = [t for t in range(T) if inp.mask[i, t] > 0]
        d = sum(abs(float(inp.logprobs[i, t] - inp.behaviour_logprobs[i, t])) for t in live) / len(live)
        f.append(math.exp(-alpha * d - beta * float(inp.context_lag[i])))
    return f


def test_downweight_scales_each_samples_pg_tokens():
    inp = _inputs()
    corr = CorrectionConfig(freshness="downweight", freshness_alpha=1.0, freshness_beta=0.5)
    loss, n, m = objective_loss(inp, ObjectiveConfig(), correction=corr)
    f = _scores(inp, 1.0, 0.5)
    n_i = [int(inp.mask[i].sum()) for i in range(B)]
    w = [fi * sum(n_i) / sum(nj * fj for nj, fj in zip(n_i, f)) for fi in f]
    ref = _reference(inp, {0, 1, 2}, w)
    torch.testing.assert_close(loss, ref)
    assert int(n) == sum(n_i)
    torch.testing.assert_close(m["offpolicy/freshness_mean"].double(),
                               torch.tensor(sum(f) / B, dtype=torch.float64))
    g, = torch.autograd.grad(loss, inp.logprobs)
    g_ref, = torch.autograd.grad(ref, inp.logprobs)
    torch.testing.assert_close(g, g_ref)
    plain, _, _ = objective_loss(_inputs(), ObjectiveConfig())
    assert abs(float(plain) - float(loss)) > 1e-4  # the weights matter on this data


def test_drop_removes_stale_samples_from_the_loss():
    inp = _inputs()
    f = _scores(inp, 1.0, 0.5)
    cut = sorted(f)[0] + 1e-6  # drop exactly the stalest sample
    corr = CorrectionConfig(freshness="drop", freshness_alpha=1.0, freshness_beta=0.5,
                            freshness_min=cut)
    loss, n, _ = objective_loss(inp, ObjectiveConfig(), correction=corr)
    keep = {i for i in range(B) if f[i] >= cut}
    assert len(keep) == B - 1
    torch.testing.assert_close(loss, _reference(inp, keep, [1.0] * B))
    assert int(n) == sum(int(inp.mask[i].sum()) for i in keep)


def test_accept_changes_nothing_but_reports_freshness():
    inp = _inputs()
    loss, _, m = objective_loss(inp, ObjectiveConfig(), correction=CorrectionConfig())
    torch.testing.assert_close(loss, _reference(inp, {0, 1, 2}, [1.0] * B))
    assert "offpolicy/freshness_mean" in m
