"""The §6 ratio decomposition (objectives/offpolicy.py) against plain-Python float64 references.

pi_theta / mu = r_d * r_s; every r_d treatment at every level, catastrophic reject and the dual
clip, written out with explicit loops (sharing no code with the module), through the composed
objective (`objective_loss`); gradients by finite differences; metrics against closed forms;
all-masked and all-rejected batches; pi_old = mu reproduces the untreated loss exactly. TP=2 over
gloo and the other PG terms are covered by tests/test_objective_library.py (CORRECTIONS).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from megatron_opd.config import CorrectionConfig, ObjectiveConfig
from megatron_opd.objectives.compose import ObjectiveInputs, objective_loss
from megatron_opd.objectives.offpolicy import (decomposed_pg_per_token, discrepancy_log_ratio,
                                               discrepancy_weights)

B, T = 4, 7
EPS_LO, EPS_HI, KL_COEF = 0.2, 0.28, 0.7


def make(seed: int):
    """Float64 [B, T]: current log pi_theta, pi_old, mu, teacher log q, mask (with padding and a
    hole). r_d spreads over ~exp(+-1) so every band in use cuts some tokens."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mu = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lq = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 5:] = 0
    mask[3, 2] = 0
    return lp, old, mu, lq, mask


def reference(lp, old, mu, lq, mask, corr: CorrectionConfig):
    """-sum_t M w min(r_s A, clip(r_s) A) / n with A = -lambda (log mu - log q) (kl_logprobs =
    behaviour: a constant), r_d treated per §6; loops over sequences and tokens."""
    lp, old, mu, lq, mask = (x.tolist() for x in (lp, old, mu, lq, mask))
    c, num, den = corr.discrepancy_c, 0.0, 0
    for b in range(len(lp)):
        ts = [t for t in range(len(lp[b])) if mask[b][t] > 0]
        r_tok = {t: math.exp(old[b][t] - mu[b][t]) for t in ts}
        prod = 1.0
        for t in ts:
            prod *= r_tok[t]
        rejected = (corr.discrepancy != "none" and corr.catastrophic_ratio > 0
                    and any(r_tok[t] < corr.catastrophic_ratio for t in ts))
        for t in ts:
            den += 1
            if rejected:
                continue
            r = {"token": r_tok[t], "sequence": prod,
                 "geometric": prod ** (1.0 / len(ts))}[corr.discrepancy_level]
            w, keep = 1.0, True
            if corr.discrepancy == "tis":
                w = min(r, c)
            elif corr.discrepancy in ("mis", "icepop"):
                keep = 1.0 / c <= r <= c
                w = r if corr.discrepancy == "icepop" else 1.0
            if not keep:
                continue
            a = -KL_COEF * (mu[b][t] - lq[b][t])
            r_s = math.exp(lp[b][t] - old[b][t])
            obj = min(r_s * a, min(max(r_s, 1 - EPS_LO), 1 + EPS_HI) * a)
            if corr.dual_clip and a < 0:
                obj = max(obj, corr.dual_clip * a)
            num += -w * obj
    return num / max(den, 1)


def run(lp, old, mu, lq, mask, corr, **cfg_kw):
    cfg = ObjectiveConfig(terms=["sampled_token_opd"], kl_logprobs="behaviour", kl_coef=KL_COEF,
                          clip_eps_low=EPS_LO, clip_eps_high=EPS_HI, **cfg_kw)
    inp = ObjectiveInputs(mask=mask, response_ids=torch.zeros(B, T, dtype=torch.long),
                          logprobs=lp, behaviour_logprobs=mu, teacher_logprobs=lq,
                          old_logprobs=old)
    return objective_loss(inp, cfg, correction=corr)


MODES = ["none", "tis", "mis", "icepop"]
LEVELS = ["token", "sequence", "geometric"]
# c per level: a product of ~6 token ratios spreads wider than one token
BAND = {"token": 1.4, "sequence": 2.5, "geometric": 1.15}


def test_r_d_times_r_s_is_the_total_ratio():
    lp, old, mu, _, mask = make(0)
    log_rd = discrepancy_log_ratio(old, mu, mask)
    _, r_s, _ = decomposed_pg_per_token(lp, old, torch.ones_like(lp), mask, eps_low=EPS_LO,
                                        eps_high=EPS_HI)
    live = mask > 0
    torch.testing.assert_close((log_rd.exp() * r_s)[live], torch.exp(lp - mu)[live],
                               rtol=1e-14, atol=0)
    assert (r_s[~live] == 1).all() and (log_rd[~live] == 0).all()


@pytest.mark.parametrize("mode,level", list(itertools.product(MODES, LEVELS)))
def test_each_treatment_and_level_matches_reference(mode, level):
    lp, old, mu, lq, mask = make(1)
    corr = CorrectionConfig(discrepancy=mode, discrepancy_level=level, discrepancy_c=BAND[level])
    x = lp.clone().requires_grad_(True)
    loss, n, m = run(x, old, mu, lq, mask, corr)
    ref = reference(lp, old, mu, lq, mask, corr)
    assert loss.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert n.item() == mask.sum().item()  # dropped tokens stay in the token count
    untreated = reference(lp, old, mu, lq, mask, CorrectionConfig(discrepancy="none"))
    dropped = m["offpolicy/masked_fraction"].item()
    if mode == "none":
        assert ref == untreated and dropped == 0
    else:  # the treatment does something on this batch, and masks cut some tokens, not all
        assert abs(ref - untreated) > 1e-4
        assert (0 < dropped < 1) if mode in ("mis", "icepop") else dropped == 0


def test_sequence_product_never_overflows():
    """A long sequence whose product of ratios is far outside float range: log space keeps w_d,
    M_d finite (tis truncates at c, icepop/mis drop the sequence)."""
    L = 400
    old = torch.zeros(1, L, dtype=torch.float64)
    mu = torch.full((1, L), -3.0, dtype=torch.float64)  # r_d = e^3 per token, e^1200 in all
    mask = torch.ones(1, L, dtype=torch.float64)
    for mode in ("tis", "icepop", "mis"):
        corr = CorrectionConfig(discrepancy=mode, discrepancy_level="sequence")
        w, keep = discrepancy_weights(old, mu, mask, corr)
        assert torch.isfinite(w).all()
        if mode == "tis":
            assert (w == 2.0).all() and (keep == 1).all()
        else:
            assert (keep == 0).all() and (w == 0).all()


def test_catastrophic_reject_drops_the_whole_sequence():
    lp, old, mu, lq, mask = make(2)
    mu[2, 3] = old[2, 3] + 12.0  # r_d = e^-12 < 1e-4 on one trainable token of sequence 2
    mu[1, 6] = old[1, 6] + 12.0  # the same on a padding token of sequence 1: ignored
    corr = CorrectionConfig(discrepancy="tis", discrepancy_c=1.4)
    x = lp.clone().requires_grad_(True)
    loss, _, m = run(x, old, mu, lq, mask, corr)
    assert loss.item() == pytest.approx(reference(lp, old, mu, lq, mask, corr), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, x)
    assert (grad[2] == 0).all() and (grad[1, :5] != 0).sum() >= 3  # some clipped
    assert m["offpolicy/masked_fraction"].item() == pytest.approx(T / mask.sum().item())
    # off (ratio 0) or untreated (discrepancy none): nothing is rejected
    for off in (dataclasses.replace(corr, catastrophic_ratio=0.0), CorrectionConfig(discrepancy="none")):
        x = lp.clone().requires_grad_(True)
        loss, _, _ = run(x, old, mu, lq, mask, off)
        (grad,) = torch.autograd.grad(loss, x)
        assert (grad[2, :T] != 0).any()
        assert loss.item() == pytest.approx(reference(lp, old, mu, lq, mask, off), rel=1e-12)


def test_dual_clip_bounds_negative_advantages():
    """Closed form per token: A < 0 with r_s far above 1 gives c |A| (no gradient); A > 0 and
    A < 0 with r_s inside the bound are untouched."""
    lp = torch.log(torch.tensor([[5.0, 5.0, 1.1, 0.5]], dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([[-2.0, 2.0, -2.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    per, _, active = decomposed_pg_per_token(lp, old, adv, mask, eps_low=0.2, eps_high=0.28,
                                             dual_clip=3.0)
    expected = [3.0 * 2.0, -1.28 * 2.0, 1.1 * 2.0, 0.8 * 1.0]
    torch.testing.assert_close(per[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-14,
                               atol=1e-14)
    assert active[0].tolist() == [1.0, 1.0, 0.0, 1.0]
    (g,) = torch.autograd.grad(per.sum(), lp)
    assert g[0, 0] == 0 and g[0, 1] == 0 and g[0, 3] == 0 and g[0, 2] != 0
    # the composed loss with a dual clip against the reference (some A < 0 tokens reach it)
    lp2, old2, mu2, lq2, mask2 = make(3)
    lp2 = lp2 + torch.where(torch.arange(T) % 2 == 0, 1.5, 0.0)  # r_s well above 1 on half
    for mode in ("none", "icepop"):
        corr = CorrectionConfig(discrepancy=mode, discrepancy_c=1.4, dual_clip=2.0)
        loss, _, _ = run(lp2, old2, mu2, lq2, mask2, corr)
        ref = reference(lp2, old2, mu2, lq2, mask2, corr)
        assert loss.item() == pytest.approx(ref, rel=1e-12)
        assert abs(ref - reference(lp2, old2, mu2, lq2, mask2,
                                   dataclasses.replace(corr, dual_clip=0.0))) > 1e-3
    with pytest.raises(ValueError, match="dual_clip"):
        decomposed_pg_per_token(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=0.5)


@pytest.mark.parametrize("corr", [
    CorrectionConfig(discrepancy="icepop", discrepancy_level="sequence", discrepancy_c=2.5),
    CorrectionConfig(discrepancy="tis", discrepancy_level="geometric", discrepancy_c=1.15,
                     dual_clip=1.6),
    CorrectionConfig(discrepancy="mis", discrepancy_c=1.4),
], ids=["icepop_sequence", "tis_geometric_dual", "mis_token"])
def test_gradient_matches_finite_differences(corr):
    lp, old, mu, lq, mask = make(4)
    x = lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: run(a, old, mu, lq, mask, corr)[0], (x,), eps=1e-6,
                                    atol=1e-9)


def test_metrics_closed_forms():
    lp, old, mu, lq, mask = make(5)
    corr = CorrectionConfig(discrepancy="icepop", discrepancy_c=1.4)
    _, _, m = run(lp.clone().requires_grad_(True), old, mu, lq, mask, corr)
    live = [(b, t) for b in range(B) for t in range(T) if mask[b, t] > 0]

    def k3(log_r):
        return math.exp(log_r) - 1 - log_r

    def quantile(vals, q):  # linear interpolation between order statistics
        vals = sorted(vals)
        pos = q * (len(vals) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(vals) - 1)
        return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
    log_rd = [(old[bt] - mu[bt]).item() for bt in live]
    log_rs = [(lp[bt] - old[bt]).item() for bt in live]
    assert m["offpolicy/mismatch_kl"].item() == pytest.approx(
        sum(map(k3, log_rd)) / len(live), rel=1e-12)
    assert m["offpolicy/staleness_kl"].item() == pytest.approx(
        sum(map(k3, log_rs)) / len(live), rel=1e-12)
    outside = sum(1 for v in log_rd if abs(v) > math.log(1.4))
    assert m["offpolicy/masked_fraction"].item() == pytest.approx(outside / len(live))
    for q in (10, 50, 90):
        assert m[f"offpolicy/r_d_p{q}"].item() == pytest.approx(
            quantile([math.exp(v) for v in log_rd], q / 100), rel=1e-12)
        assert m[f"offpolicy/r_s_p{q}"].item() == pytest.approx(
            quantile([math.exp(v) for v in log_rs], q / 100), rel=1e-12)
    clipped = 0
    for (b, t), v, s in zip(live, log_rd, log_rs):
        a = -KL_COEF * (mu[b, t] - lq[b, t]).item()
        if abs(v) <= math.log(1.4) and ((a > 0 and s > math.log(1 + EPS_HI))
                                        or (a < 0 and s < math.log(1 - EPS_LO))):
            clipped += 1
    assert clipped > 0
    assert m["offpolicy/clip_fraction"].item() == pytest.approx(clipped / len(live))
    # every trainable token is exactly one of: dropped by M_d, clipped, active
    assert m["offpolicy/active_fraction"].item() == pytest.approx(
        1 - outside / len(live) - clipped / len(live))
    assert m["sampled_token_opd/clip_fraction"] == m["offpolicy/clip_fraction"]


def test_all_masked_and_all_rejected_batches_are_finite_zero():
    lp, old, mu, lq, mask = make(6)
    corr = CorrectionConfig(discrepancy="icepop", discrepancy_level="sequence", dual_clip=2.0)
    for m_ in (torch.zeros_like(mask), mask):
        o = old if m_.sum() == 0 else mu + 5.0  # second: every sequence far outside the band
        x = lp.clone().requires_grad_(True)
        loss, n, metrics = run(x, o, mu, lq, m_, corr)
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())
        assert n.item() == m_.sum().item()
    assert metrics["offpolicy/masked_fraction"].item() == 1.0
    assert metrics["offpolicy/active_fraction"].item() == 0.0


@pytest.mark.parametrize("mode,level", [("tis", "token"), ("icepop", "sequence"),
                                        ("mis", "geometric")])
def test_without_old_logprobs_every_treatment_is_todays_loss(mode, level):
    """old_logprobs None: pi_old = mu, r_d = 1 exactly, so any treatment gives the untreated loss
    (the pre-decomposition formula, r = pi_theta / mu) and its gradient, bit for bit."""
    lp, _, mu, lq, mask = make(7)
    corr = CorrectionConfig(discrepancy=mode, discrepancy_level=level, discrepancy_c=1.1)
    grads, losses = [], []
    for c in (corr, None):
        x = lp.clone().requires_grad_(True)
        loss, _, m = run(x, None, mu, lq, mask, c)
        (g,) = torch.autograd.grad(loss, x)
        losses.append(loss.item())
        grads.append(g)
        assert m["offpolicy/mismatch_kl"] == 0 and m["offpolicy/masked_fraction"] == 0
        assert m["offpolicy/r_d_p10"] == 1 and m["offpolicy/r_d_p90"] == 1
    assert losses[0] == losses[1]
    assert torch.equal(grads[0], grads[1])
    assert losses[0] == pytest.approx(reference(lp, mu, mu, lq, mask, CorrectionConfig()),
                                      rel=1e-12)


def test_bad_band_is_refused():
    lp, old, mu, _, mask = make(8)
    with pytest.raises(ValueError, match="discrepancy_c"):
        discrepancy_weights(old, mu, mask, CorrectionConfig(discrepancy="mis", discrepancy_c=1.0))
