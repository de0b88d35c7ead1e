"""AOPD, asymmetric on-policy distillation (ALGORITHMS.md §3, [secondary]: arXiv 2605.06387).

A_t = sg(log q(y_t) - log pi(y_t)); gate G_t = 1[q(y_t) - pi(y_t) <= tau] (probabilities; tau = 0
is A_t <= 0: the teacher likes the sampled token no more than the student does). Where G_t = 0
the token keeps its policy-gradient term (plain -A_t log pi_theta(y_t), or the clipped §6 form);
where G_t = 1 it is replaced by a local forward KL on the teacher's top-K,

    L_loc,t = (1/K) sum_{v in TopK(q)} q(v) (log q(v) - log pi_theta(v))

with pi_theta's full-softmax log-probs at those ids (student top-K logits minus the full
log-normaliser: from the vocab-parallel statistics, differentiable through both).
L = mean_t [G_t L_loc,t + (1 - G_t) L_PG,t], the branch picked per token with `where` (never
arithmetic mixing): the unused branch's inputs are zeroed first, so log q(y_t) = -inf on a gated
token (A_t = -inf there) leaves the loss and its gradient finite. Teacher top-K entries with
q(v) = 0 contribute 0 (0 log 0 = 0). The PG branch carries the §6 r_d treatment (w_d, M_d, both
forms); the local KL does not (it is a direct loss, not an importance-sampled one).
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.policy_gradient import (clipped_pg_per_token, masked_mean,
                                                     masked_where)

PG_FORMS = ("clipped", "plain")


def local_forward_kl(teacher_topk_logprobs: torch.Tensor, student_topk_logprobs: torch.Tensor
                     ) -> torch.Tensor:
    """[..., K] -> [...]: (1/K) sum_v q(v) (log q(v) - log pi(v)), entries with q(v) = 0 (log q
    = -inf) exactly 0 in value and gradient."""
    has_q = teacher_topk_logprobs > -torch.inf
    lq = torch.where(has_q, teacher_topk_logprobs, torch.zeros_like(teacher_topk_logprobs))
    terms = torch.where(has_q, lq.exp() * (lq - student_topk_logprobs),
                        torch.zeros_like(student_topk_logprobs))
    return terms.mean(dim=-1)


def aopd_loss(logprobs: torch.Tensor, kl_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
              teacher_logprobs: torch.Tensor, student_topk_logprobs: torch.Tensor,
              teacher_topk_logprobs: torch.Tensor, mask: torch.Tensor, *, tau: float = 0.0,
              pg_form: str = "clipped", clip_eps_low: float = 0.2, clip_eps_high: float = 0.28,
              discrepancy_weight: torch.Tensor | None = None,
              discrepancy_mask: torch.Tensor | None = None, dual_clip: float = 0.0,
              local_kl: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logprobs [..., T] (with grad): current log pi_theta(y_t); kl_logprobs: the pi of A_t and
    the gate (a constant); student_topk_logprobs [..., T, K] (with grad): full-softmax
    log pi_theta at the teacher's top-K ids; teacher_topk_logprobs [..., T, K]: log q there.
    discrepancy_weight / discrepancy_mask / dual_clip: the §6 r_d treatment of the PG branch.
    local_kl [..., T] (with grad; teacher.signal=hidden): the local term over the whole
    vocabulary, KL(q || pi_theta) exactly, used instead of the top-K sum (the two top-K arguments
    are then unused, may be None). The top-K form's 1/K is not carried over: with K = V it would
    scale the term to nothing; the full KL is the sum the top-K form truncates."""
    if pg_form not in PG_FORMS:
        raise ValueError(f"objective.aopd.pg_form: unknown {pg_form!r}; known: {list(PG_FORMS)}")
    maskf = mask.to(logprobs.dtype)
    live = maskf > 0
    adv = masked_where((teacher_logprobs - kl_logprobs).detach(), maskf)
    gated = live & (teacher_logprobs.exp() - kl_logprobs.detach().exp() <= tau)
    gate = gated.to(logprobs.dtype)
    ungated = live & ~gated
    # each branch sees only its own tokens: junk (or -inf) of the other cannot reach it
    if local_kl is not None:
        local = masked_where(local_kl.to(logprobs.dtype), gate)
    else:
        m = gated[..., None]
        lq = torch.where(m, teacher_topk_logprobs.to(logprobs.dtype),
                         torch.zeros_like(student_topk_logprobs))
        lp = torch.where(m, student_topk_logprobs, torch.zeros_like(student_topk_logprobs))
        local = masked_where(local_forward_kl(lq, lp), gate)
    kept = ungated if discrepancy_mask is None else ungated & (discrepancy_mask > 0)
    pg_adv = masked_where(adv, ungated)
    if pg_form == "plain":
        w = torch.ones_like(logprobs) if discrepancy_weight is None else discrepancy_weight.detach()
        pg = masked_where(-w * pg_adv * logprobs, kept)
        ratio = torch.ones_like(logprobs)
        clipped = torch.zeros_like(logprobs)
    else:
        pg, ratio, clipped = clipped_pg_per_token(
            logprobs, old_logprobs, pg_adv, maskf, clip_eps_low, clip_eps_high,
            discrepancy_weight=discrepancy_weight, discrepancy_mask=kept, dual_clip=dual_clip)
    per_token = torch.where(gated, local, masked_where(pg, ungated))
    loss = masked_mean(per_token, maskf)
    with torch.no_grad():
        metrics = {"aopd_gate_fraction": masked_mean(gate, maskf),
                   "aopd_local_kl": masked_mean(local, gate),
                   "aopd_pg": masked_mean(pg, ungated.to(maskf.dtype)),
                   "aopd_advantage_mean": masked_mean(adv, maskf),
                   "ratio_mean": masked_mean(ratio, maskf),
                   "clip_fraction": masked_mean(clipped, maskf),
                   # gated tokens train through the local KL; the rest unless dropped or clipped
                   "active_fraction": masked_mean(gate + kept.to(maskf.dtype) - clipped, maskf)}
    return loss, metrics
