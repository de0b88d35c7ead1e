"""Every objective term against an independent float64 reference, unsharded and vocab-sharded.

The reference (`_reference_loss`) starts from the full-vocab logits and writes each formula of
ALGORITHMS.md out directly (log_softmax over the whole vocabulary, explicit renormalisation on the
support, python-level gate and selection), sharing no code with megatron_opd.objectives. The code
under test runs the learner's own loss function (`objective_loss_fn`: vocab-parallel statistics
then the pure objective functions). Also: finite-difference gradients (gradcheck), exactly zero
loss and gradient on masked tokens whatever junk they hold, a finite value on an all-masked batch,
and TP=2 over gloo equal to the unsharded reference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_opd.config import CorrectionConfig, ObjectiveConfig
from megatron_opd.learner.losses import objective_fields, objective_loss_fn
from megatron_opd.learner.train_step import MicroBatch
from megatron_opd.objectives.grpo import group_normalized_advantages
from megatron_opd.procs import free_port
from tests.gloo import gloo_rank

B, T, V, K = 3, 6, 20, 5


def _cfg(terms, **kw) -> ObjectiveConfig:
    cfg = ObjectiveConfig(terms=list(terms))
    for key, value in kw.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, value)
    return cfg


# name -> config: every term, each knob that changes the math, and compositions
CASES = {
    "opd_current": _cfg(["sampled_token_opd"]),
    "opd_behaviour_discount": _cfg(["sampled_token_opd"], kl_logprobs="behaviour", discount=0.7,
                                   kl_coef=0.5),
    "opd_temperature_off": _cfg(["sampled_token_opd"], use_sampler_temperature=False),
    "lsm": _cfg(["lsm"]),
    "lsm_clamp": _cfg(["lsm"], **{"lsm.log_ratio_clamp": 0.3}),
    "aopd_clipped": _cfg(["aopd"]),
    "aopd_plain_tau": _cfg(["aopd"], **{"aopd.pg_form": "plain", "aopd.tau": 0.05}),
    "vopd_topk": _cfg(["vopd"]),
    "vopd_full": _cfg(["vopd"], **{"vopd.support": "full"}),
    "grpo_opd": _cfg(["grpo_opd"], kl_coef=0.3),
    "offline_opd": _cfg(["offline_opd"], kl_logprobs="old"),
    "lsm+opd_weighted": _cfg(["lsm", "sampled_token_opd"], weights=[0.7, 0.3]),
    "tip_sampled": _cfg(["sampled_token_opd"], **{"token_selection.method": "tip",
                                                  "token_selection.keep_ratio": 0.5}),
    "tip_topk_lsm": _cfg(["lsm"], **{"token_selection.method": "tip",
                                     "token_selection.divergence": "topk",
                                     "token_selection.keep_ratio": 0.3}),
    "masked_tokens": _cfg(["sampled_token_opd", "lsm"]),
    # TIP with gamma > 0: returns over the unselected mask
    "tip_discount": _cfg(["sampled_token_opd"], discount=0.8, **{"token_selection.method": "tip",
                                                                 "token_selection.keep_ratio": 0.5}),
    # §6 ratio decomposition with a real pi_old (the batch then carries old_logprobs)
    "opd_icepop_sequence": _cfg(["sampled_token_opd"]),
    "aopd_tis": _cfg(["aopd"]),
    "aopd_plain_mis": _cfg(["aopd"], **{"aopd.pg_form": "plain"}),
    "vopd_mis_geometric": _cfg(["vopd"]),
    "grpo_icepop_token": _cfg(["grpo_opd"], kl_coef=0.3),
    "offline_old_tis_sequence": _cfg(["offline_opd"], kl_logprobs="old"),
}
MASKED_IDS = {"masked_tokens": (4, 7)}


def _corr(**kw) -> CorrectionConfig:
    return CorrectionConfig(**kw)


CORRECTIONS = {
    "opd_icepop_sequence": _corr(discrepancy="icepop", discrepancy_level="sequence",
                                 discrepancy_c=2.0, dual_clip=1.5),
    "aopd_tis": _corr(discrepancy="tis", discrepancy_c=1.2),
    "aopd_plain_mis": _corr(discrepancy="mis", discrepancy_c=1.3),
    "vopd_mis_geometric": _corr(discrepancy="mis", discrepancy_level="geometric",
                                discrepancy_c=1.1),
    "grpo_icepop_token": _corr(discrepancy="icepop", discrepancy_c=1.3, dual_clip=1.2),
    "offline_old_tis_sequence": _corr(discrepancy="tis", discrepancy_level="sequence",
                                      discrepancy_c=1.5, dual_clip=1.2),
}


def _batch(seed: int, full_teacher: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full-vocab logits [B, T+1, V] (float64) and the micro-batch data the learner would see.
    Old/behaviour log-probs are the current ones plus noise (ratios near 1, some clipped)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 2
    temperature = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)
    index = torch.arange(T).expand(B, T).clone()
    resp = torch.randint(0, V, (B, T), generator=g)
    resp[0, :3] = torch.tensor([4, 4, 7])  # masked-token ids, repeated (only the first leaves)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0  # padding
    mask[2, 0] = 0  # a prompt/tool token inside the response
    logp_now = torch.log_softmax(z[:, :T] / temperature[:, None, None], -1).gather(
        -1, resp[..., None]).squeeze(-1)
    mu = logp_now + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    lq_full = torch.log_softmax(teacher_logits, -1)
    k = V if full_teacher else K
    top = lq_full.topk(k, dim=-1)
    # pi_old: the learner's log-probs at the rollout's version, off mu by the train-inference gap
    old = mu + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    data = {
        "old_logprobs": old.float(),
        "response_index": index, "response_ids": resp, "loss_mask": mask,
        "behaviour_logprobs": mu.float(),
        "teacher_logprobs": lq_full.gather(-1, resp[..., None]).squeeze(-1).float(),
        "temperature": temperature.float(),
        # the teacher's scoring temperature: the distillation side (one sample away from both 1
        # and its sampler's T, so the reference tells the two sides apart; exact in float32)
        "teacher_temperature": torch.tensor([1.0, 1.0, 0.75]),
        "teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.values.float(),
        "sample_advantages": group_normalized_advantages(torch.tensor([1.0, 0.0, 1.0]),
                                                         torch.tensor([0, 0, 0])),
    }
    # junk where the mask is 0: nothing of it may reach the loss or its gradient
    for name in ("behaviour_logprobs", "teacher_logprobs", "old_logprobs"):
        data[name] = torch.where(mask > 0, data[name], torch.full_like(data[name], -1e30))
    return z, data


def _reference_correction(mu: torch.Tensor, old: torch.Tensor, live: torch.Tensor,
                          corr: CorrectionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_d, M_d) of §6 by explicit loops over sequences and tokens."""
    w, keep = torch.ones(B, T, dtype=torch.float64), torch.ones(B, T, dtype=torch.float64)
    c = corr.discrepancy_c
    for b in range(B):
        ts = [t for t in range(T) if live[b, t]]
        ratios = [math.exp(old[b, t].item() - mu[b, t].item()) for t in ts]
        seq = math.prod(ratios)
        for t, r_tok in zip(ts, ratios):
            r = {"token": r_tok, "sequence": seq,
                 "geometric": seq ** (1 / len(ts))}[corr.discrepancy_level]
            inside = 1 / c <= r <= c
            if corr.discrepancy == "tis":
                w[b, t] = min(r, c)
            elif corr.discrepancy == "mis":
                keep[b, t] = float(inside)
            elif corr.discrepancy == "icepop":
                keep[b, t], w[b, t] = float(inside), r
        if corr.catastrophic_ratio > 0 and any(r < corr.catastrophic_ratio for r in ratios):
            keep[b] = 0.0
    return w, keep


def _reference_loss(z: torch.Tensor, d: dict, cfg: ObjectiveConfig, masked_ids=(),
                    corr: CorrectionConfig | None = None) -> torch.Tensor:
    """Float64, written from ALGORITHMS.md: token mean over the final mask of the weighted terms.
    With `corr`, pi_old is the batch's old_logprobs and r_d is treated as §6 says."""
    temp = d["temperature"].double() if cfg.use_sampler_temperature else torch.ones(B, dtype=torch.float64)
    logp_all = torch.log_softmax(z[:, :T] / temp[:, None, None], -1)  # [B, T, V]: ratio side
    tq = d["teacher_temperature"].double()  # distillation side: the teacher's temperature
    logpq_all = torch.log_softmax(z[:, :T] / tq[:, None, None], -1)
    y = d["response_ids"]
    logp = logp_all.gather(-1, y[..., None]).squeeze(-1)
    logpq = logpq_all.gather(-1, y[..., None]).squeeze(-1)
    live0 = d["loss_mask"] > 0  # the reference need not survive junk: zero it first
    mu = torch.where(live0, d["behaviour_logprobs"].double(), 0.0)
    lq_y = torch.where(live0, d["teacher_logprobs"].double(), 0.0)
    ids, lq_top = d["teacher_topk_ids"], d["teacher_topk_logprobs"].double()
    if corr is not None:
        old = torch.where(live0, d["old_logprobs"].double(), 0.0)
        w_d, m_d = _reference_correction(mu, old, live0, corr)
    else:
        old, w_d, m_d = mu, torch.ones(B, T, dtype=torch.float64), torch.ones(B, T, dtype=torch.float64)
    mask = d["loss_mask"].clone().double()
    for sid in masked_ids:  # first occurrence per response leaves the loss
        for b in range(B):
            for t in range(T):
                if mask[b, t] > 0 and y[b, t] == sid:
                    mask[b, t] = 0
                    break
    ret_mask = mask.clone()  # the returns' mask: TIP below selects gradients only
    sel = cfg.token_selection
    if sel.method == "tip":
        p_all = logp_all.exp()
        ent = -(p_all * logp_all).sum(-1)
        if sel.divergence == "sampled":
            div = (logpq - lq_y).abs()
        else:
            div = (lq_top.exp() * (lq_top - logpq_all.gather(-1, ids))).sum(-1)
        live = [(b, t) for b in range(B) for t in range(T) if mask[b, t] > 0]

        def norm(x):
            vals = [x[b, t].item() for b, t in live]
            lo, hi = min(vals), max(vals)
            return {bt: (x[bt].item() - lo) / (hi - lo) if hi > lo else 0.0 for bt in live}
        h, dv = norm(ent), norm(div)
        score = {bt: h[bt] + dv[bt] - h[bt] * dv[bt] for bt in live}
        keep = math.ceil(sel.keep_ratio * len(live))
        # descending score, ties by flat position
        chosen = sorted(live, key=lambda bt: (-score[bt], bt[0] * T + bt[1]))[:keep]
        new = torch.zeros_like(mask)
        for bt in chosen:
            new[bt] = mask[bt]
        mask = new
    n = mask.sum()
    kl_src = {"current": logpq.detach(), "behaviour": mu, "old": old}[cfg.kl_logprobs]
    ratio = torch.exp(logp - old)
    dual = corr.dual_clip if corr is not None else 0.0

    def pg(adv):  # per token: -M_d w_d min(r_s A, clip(r_s) A), dual-clipped for A < 0
        obj = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv)
        if dual:
            obj = torch.where(adv < 0, torch.maximum(obj, dual * adv), obj)
        return -m_d * w_d * obj

    def tmean(x):
        return (x * mask).sum() / max(n.item(), 1.0)

    def topk_renorm_kl(student_logits_top):
        lp_hat = torch.log_softmax(student_logits_top, -1)
        lq_hat = torch.log_softmax(lq_top, -1)
        r = lp_hat - lq_hat
        if cfg.lsm.log_ratio_clamp > 0:
            r = r.clamp(-cfg.lsm.log_ratio_clamp, cfg.lsm.log_ratio_clamp)
        return (lp_hat.exp() * r).sum(-1)

    z_top = (z[:, :T] / tq[:, None, None]).gather(-1, ids)
    total = 0.0
    weights = cfg.weights or [1.0] * len(cfg.terms)
    for term, w in zip(cfg.terms, weights):
        if term in ("sampled_token_opd", "offline_opd"):
            k_t = (kl_src - lq_y) * ret_mask
            adv = torch.zeros_like(k_t)
            for b in range(B):
                run = 0.0
                for t in reversed(range(T)):
                    run = k_t[b, t] + cfg.discount * run
                    adv[b, t] = run
            loss = tmean(pg(-cfg.kl_coef * adv))
        elif term == "lsm":
            loss = tmean(topk_renorm_kl(z_top))
        elif term == "aopd":
            adv = lq_y - kl_src
            gate = (lq_y.exp() - kl_src.exp() <= cfg.aopd.tau).double()
            local = (lq_top.exp() * (lq_top - logpq_all.gather(-1, ids))).sum(-1) / ids.shape[-1]
            pg_t = -m_d * w_d * adv * logp if cfg.aopd.pg_form == "plain" else pg(adv)
            loss = tmean(gate * local + (1 - gate) * pg_t)
        elif term == "vopd":
            if cfg.vopd.support == "full":
                lq_full = torch.full_like(logpq_all, -math.inf).scatter(-1, ids, lq_top)
                kl = (logpq_all.exp() * (logpq_all - lq_full)).sum(-1)
            else:
                kl = topk_renorm_kl(z_top.detach())
            loss = tmean(pg(cfg.kl_coef * (lq_y - kl_src + kl.detach())))
        elif term == "grpo_opd":
            adv = d["sample_advantages"].double()[:, None] + cfg.kl_coef * (lq_y - kl_src)
            loss = tmean(pg(adv))
        else:
            raise AssertionError(term)
        total = total + w * loss
    return total


def _under_test(z: torch.Tensor, d: dict, cfg: ObjectiveConfig, masked_ids=(), group=None,
                shard=None, corr: CorrectionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The learner's loss fn: returns (loss sum / tokens, tokens, metrics); `shard` = (rank, tp).
    With `corr` the micro-batch carries pi_old (old_logprobs)."""
    logits = z if shard is None else z[..., shard[0] * V // shard[1]:(shard[0] + 1) * V // shard[1]]
    fields = list(objective_fields(cfg)) + (["old_logprobs"] if corr is not None else [])
    # fields the loss does not read (e.g. per-sample freshness inputs) need not be built here
    mb = MicroBatch(torch.zeros(B, T + 1, dtype=torch.long), {f: d[f] for f in fields if f in d})
    loss_sum, n, metrics = objective_loss_fn(cfg, group, masked_ids, corr)(logits, mb)
    means = {k: (s / c).detach() for k, (s, c) in metrics.items()}  # (sum, count) -> mean
    return loss_sum / n.clamp_min(1), n, means


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    cfg = CASES[name]
    z, d = _batch(1, full_teacher=cfg.vopd.support == "full" and "vopd" in cfg.terms)
    masked = MASKED_IDS.get(name, ())
    zt = z.clone().requires_grad_(True)
    corr = CORRECTIONS.get(name)
    got, n, m = _under_test(zt, d, cfg, masked, corr=corr)
    zr = z.clone().requires_grad_(True)
    ref = _reference_loss(zr, d, cfg, masked, corr)
    assert torch.isfinite(got) and abs(got.item()) > 1e-4  # a loss that can be wrong
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    (g_got,) = torch.autograd.grad(got, zt)
    (g_ref,) = torch.autograd.grad(ref, zr)
    assert g_ref.abs().max() > 1e-4
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-10)
    if corr is not None:  # the treatment changes the loss; masks drop some tokens, not all
        untreated = _reference_loss(z, d, cfg, masked, CorrectionConfig(discrepancy="none"))
        assert abs(untreated.item() - ref.item()) > 1e-6
        dropped = m["offpolicy/masked_fraction"].item()
        assert (0 < dropped < 1) if corr.discrepancy in ("mis", "icepop") else dropped == 0
        if corr.dual_clip:  # cases chosen so the dual bound is reached on this batch
            no_dual = _reference_loss(z, d, cfg, masked, dataclasses.replace(corr, dual_clip=0.0))
            assert abs(no_dual.item() - ref.item()) > 1e-6


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("vopd")])
def test_finite_difference_gradient(name):
    """gradcheck through the whole loss (vocab-parallel statistics included). Stop-gradient
    quantities computed from the current policy would make finite differences disagree by design,
    so the advantage's pi is the behaviour mu here; vOPD's closed-form KL is sg of the current
    policy: its pure function is checked below with KL_t as an input."""
    cfg = copy.deepcopy(CASES[name])
    cfg.kl_logprobs = "behaviour"
    z, d = _batch(2)
    z = z.clone().requires_grad_(True)
    masked = MASKED_IDS.get(name, ())
    corr = CORRECTIONS.get(name)
    assert torch.autograd.gradcheck(lambda x: _under_test(x, d, cfg, masked, corr=corr)[0], (z,), eps=1e-6,
                                    atol=1e-7)


def test_finite_difference_gradient_vopd_pure():
    from megatron_opd.objectives.vopd import vopd_loss

    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    mu = lp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    q = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    kl = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.2).double()
    assert torch.autograd.gradcheck(
        lambda x: vopd_loss(x, mu, mu, q, kl, mask, kl_coef=0.7)[0], (lp,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_masked_tokens_contribute_exactly_zero(name):
    """Junk in every per-token input at masked positions (huge logits there too) changes neither
    the loss nor any gradient, and those positions' logits get exactly 0 gradient."""
    cfg = CASES[name]
    if cfg.token_selection.method == "tip":
        pytest.skip("TIP's min-max normalisation is over trainable tokens only: covered by the "
                    "reference test; junk logits at masked positions are checked below")
    full = cfg.vopd.support == "full" and "vopd" in cfg.terms
    z, d = _batch(3, full_teacher=full)
    masked = MASKED_IDS.get(name, ())
    zt = z.clone().requires_grad_(True)
    corr = CORRECTIONS.get(name)
    base, _, _ = _under_test(zt, d, cfg, masked, corr=corr)
    (g_base,) = torch.autograd.grad(base, zt)
    off = d["loss_mask"] == 0
    z2, d2 = z.clone(), {k: v.clone() for k, v in d.items()}
    z2[:, :T][off] = 1e4 * torch.sign(torch.randn(int(off.sum()), V, dtype=torch.float64))
    d2["teacher_topk_logprobs"][off] = -1e30
    d2["old_logprobs"][off] = 1e30
    d2["response_ids"][off] = V - 1
    z2 = z2.requires_grad_(True)
    junk, _, _ = _under_test(z2, d2, cfg, masked, corr=corr)
    (g_junk,) = torch.autograd.grad(junk, z2)
    torch.testing.assert_close(junk, base, rtol=0, atol=0)
    assert (g_junk[:, :T][off] == 0).all()
    torch.testing.assert_close(g_junk[:, :T][~off], g_base[:, :T][~off], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_all_masked_batch_is_finite_zero(name):
    cfg = CASES[name]
    z, d = _batch(4, full_teacher=cfg.vopd.support == "full" and "vopd" in cfg.terms)
    d["loss_mask"] = torch.zeros_like(d["loss_mask"])
    zt = z.clone().requires_grad_(True)
    loss_sum, n, metrics = objective_loss_fn(cfg, None, MASKED_IDS.get(name, ()),
                                             CORRECTIONS.get(name))(
        zt, MicroBatch(torch.zeros(B, T + 1, dtype=torch.long),
                       {f: d[f] for f in [*objective_fields(cfg), "old_logprobs"] if f in d}))
    assert n.item() == 0 and loss_sum.item() == 0.0
    loss_sum.backward()
    assert (zt.grad == 0).all()
    assert all(torch.isfinite(s).all() for s, _ in metrics.values())


def test_metrics_report_what_the_terms_did():
    z, d = _batch(5)
    _, n, m = _under_test(z.clone().requires_grad_(True), d, CASES["aopd_clipped"])
    gate = m["aopd/aopd_gate_fraction"]
    assert 0 < gate < 1  # random teacher: some tokens gated each way
    _, n_tip, m = _under_test(z.clone(), d, CASES["tip_sampled"])
    live = (d["loss_mask"] > 0).sum().item()
    assert n_tip == math.ceil(0.5 * live)
    assert m["masked_fraction"] == pytest.approx(1 - math.ceil(0.5 * live) / live)
    _, _, m = _under_test(z.clone(), d, CASES["masked_tokens"], MASKED_IDS["masked_tokens"])
    assert m["special_masked_fraction"] == pytest.approx(2 / live)
    for q in ("p10", "p50", "p90"):
        assert f"sampled_token_opd/advantage_{q}" in m
    p = torch.log_softmax(z[:, :T] / d["temperature"].double()[:, None, None], -1)
    ent = -(p.exp() * p).sum(-1)
    mask = d["loss_mask"].double().clone()
    mask[0, 0] = mask[0, 2] = 0  # the two masked-token first occurrences
    torch.testing.assert_close(m["entropy"], (ent * mask).sum() / mask.sum())


def test_group_normalized_advantages_closed_form():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 3.0])
    g = torch.tensor([7, 7, 7, 7, 2, 2, 9, 5])
    got = group_normalized_advantages(r, g, eps=0.0)
    # group 7: mean .5, std .5 -> +-1; group 2: mean .75, std .25 -> +-1; 9, 5: singletons -> 0
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 0.0, 0.0]))


def _tp_worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_rank(rank, world, port):
        group = dist.new_group([0, 1])
        res = {}
        for name, cfg in CASES.items():
            z, d = _batch(6, full_teacher=cfg.vopd.support == "full" and "vopd" in cfg.terms)
            zt = z.clone().requires_grad_(True)
            loss, _, _ = _under_test(zt, d, cfg, MASKED_IDS.get(name, ()), group=group,
                                     shard=(rank, world), corr=CORRECTIONS.get(name))
            (g,) = torch.autograd.grad(loss, zt)
            res[name] = (loss.detach(), g)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def test_tp2_vocab_sharded_equals_reference(tmp_path):
    """Each rank holds half the vocabulary; the loss on both ranks and the concatenated logit
    gradients equal the unsharded float64 reference."""
    mp.spawn(_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, cfg in CASES.items():
        z, d = _batch(6, full_teacher=cfg.vopd.support == "full" and "vopd" in cfg.terms)
        zr = z.clone().requires_grad_(True)
        ref = _reference_loss(zr, d, copy.deepcopy(cfg), MASKED_IDS.get(name, ()),
                              CORRECTIONS.get(name))
        (g_ref,) = torch.autograd.grad(ref, zr)
        for r in range(2):
            torch.testing.assert_close(ranks[r][name][0], ref.detach(), rtol=1e-10, atol=1e-10,
                                       msg=name)
        # each rank's gradient is nonzero only on its own half of the vocabulary
        half = V // 2
        g = torch.cat([ranks[0][name][1][..., :half], ranks[1][name][1][..., half:]], dim=-1)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=name)


def _aopd_reference(lp, kl, lq, lp_top, lq_top, mask, tau):
    """Plain-loop float64 AOPD (plain PG form): per token either the local forward KL over the
    teacher's top-K with 0 log 0 = 0, or -A log pi; token mean over the mask."""
    lp, kl, lq, lp_top, lq_top, mask = (x.tolist() for x in (lp, kl, lq, lp_top, lq_top, mask))
    total, n = 0.0, 0
    for b in range(len(lp)):
        for t in range(len(lp[0])):
            if not mask[b][t]:
                continue
            n += 1
            if math.exp(lq[b][t]) - math.exp(kl[b][t]) <= tau:
                total += sum(math.exp(q) * (q - p) for q, p in zip(lq_top[b][t], lp_top[b][t])
                             if q > -math.inf) / len(lq_top[b][t])
            else:
                total += -(lq[b][t] - kl[b][t]) * lp[b][t]
    return total / max(n, 1)


@pytest.mark.parametrize("pg_form", ["plain", "clipped"])
def test_aopd_minus_inf_teacher_is_finite(pg_form):
    """log q(y_t) = -inf on a gated token (A_t = -inf: its PG branch is unused) and teacher
    top-K entries with q(v) = 0: the loss equals the formula's finite value and the gradient is
    finite and matches finite differences (ALGORITHMS.md conventions: where, 0 log 0 = 0)."""
    from megatron_opd.objectives.aopd import aopd_loss

    g = torch.Generator().manual_seed(11)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1)
    lq = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    lq[0, 1] = -math.inf  # gated (q - pi < 0), A = -inf
    lq[2, 3] = -math.inf
    top = torch.log_softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1)
    top[0, 1, 3:] = -math.inf  # teacher puts no mass on these ids: q log q = 0
    top[1, 2, -1] = -math.inf
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 5] = 0
    lp_top = torch.log_softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1)
    kl = lp.clone()  # "current": A and the gate from pi_theta (sg)

    def f(x, xt):
        return aopd_loss(x, kl, x.detach(), lq, xt, top, mask, pg_form=pg_form)[0]
    x, xt = lp.clone().requires_grad_(True), lp_top.clone().requires_grad_(True)
    loss = f(x, xt)
    # at r_s = 1 the clipped form's value equals the plain one (-A * 1); the plain one is -A log pi
    ref = _aopd_reference(lp if pg_form == "plain" else torch.ones_like(lp), kl, lq, lp_top, top,
                          mask, 0.0)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    gx, gt = torch.autograd.grad(loss, (x, xt))
    assert torch.isfinite(gx).all() and torch.isfinite(gt).all()
    assert (gt[0, 1, 3:] == 0).all()  # q(v) = 0: no pull on pi(v)
    assert gt[0, 1, :3].abs().min() > 0
    if pg_form == "plain":  # kl fixed: the gradient check sees the function it differentiates
        kl_fixed = kl.clone()
        assert torch.autograd.gradcheck(
            lambda a, b: aopd_loss(a, kl_fixed, kl_fixed, lq, b, top, mask, pg_form="plain")[0],
            (x, xt), eps=1e-6, atol=1e-8)


def test_tip_with_discount_keeps_the_unselected_returns():
    """TIP picks which tokens get a gradient; the gamma-discounted returns of the kept tokens are
    those over the whole (unselected) mask. With pi_old = pi_theta (r_s = 1, nothing clipped)
    d loss / d log pi_t = -A_t / n on kept tokens, so the gradient reads the returns back."""
    from megatron_opd.objectives.compose import ObjectiveInputs, objective_loss

    g = torch.Generator().manual_seed(12)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mu = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lq = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    cfg = _cfg(["sampled_token_opd"], kl_logprobs="behaviour", discount=0.8, kl_coef=0.7,
               **{"token_selection.method": "tip", "token_selection.keep_ratio": 0.5})
    x = lp.clone().requires_grad_(True)
    loss, n, _ = objective_loss(ObjectiveInputs(
        mask=mask, response_ids=torch.zeros(B, T, dtype=torch.long), logprobs=x,
        behaviour_logprobs=mu, teacher_logprobs=lq, old_logprobs=lp, entropy=ent), cfg,
        correction=CorrectionConfig(discrepancy="none"))  # r_d left out: returns only
    (grad,) = torch.autograd.grad(loss, x)
    kept = grad != 0
    assert int(kept.sum()) == int(n) == math.ceil(0.5 * int(mask.sum()))
    full, sel = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):  # returns over the whole mask, and (the old bug) over the kept tokens
        run_full = run_sel = 0.0
        for t in reversed(range(T)):
            k = (mu[b, t] - lq[b, t]).item() * mask[b, t].item()
            run_full = k + 0.8 * run_full
            run_sel = k * kept[b, t].item() + 0.8 * run_sel
            full[b, t], sel[b, t] = -0.7 * run_full, -0.7 * run_sel
    torch.testing.assert_close(-grad[kept] * n, full[kept], rtol=1e-12, atol=1e-12)
    assert (full[kept] - sel[kept]).abs().max() > 1e-3  # the two conventions differ here
