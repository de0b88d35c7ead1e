"""AOPD, asymmetric on-policy distillation (ALGORITHMS.md §3, [secondary]: arXiv 2605.06387).

A_t = sg(log q(y_t) - log pi(y_t)); gate G_t = 1[q(y_t) - pi(y_t) <= tau] (probabilities; tau = 0
is A_t <= 0: the teacher likes the sampled token no more than the student does). Where G_t = 0
the token keeps its policy-gradient term (plain -A_t log pi_theta(y_t), or the clipped §6 form);
where G_t = 1 it is replaced by a local forward KL on the teacher's top-K,

    L_loc,t = (1/K) sum_{v in TopK(q)} q(v) (log q(v) - log pi_theta(v))

with pi_theta's full-softmax log-probs at those ids (student top-K logits minus the full
log-normaliser: from the vocab-parallel statistics, differentiable through both).
L = mean_t [G_t L_loc,t + (1 - G_t) L_PG,t].
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.policy_gradient import (clipped_pg_per_token, masked_mean,
                                                     masked_where)

PG_FORMS = ("clipped", "plain")


def aopd_loss(logprobs: torch.Tensor, kl_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
              teacher_logprobs: torch.Tensor, student_topk_logprobs: torch.Tensor,
              teacher_topk_logprobs: torch.Tensor, mask: torch.Tensor, *, tau: float = 0.0,
              pg_form: str = "clipped", clip_eps_low: float = 0.2, clip_eps_high: float = 0.28,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logprobs [..., T] (with grad): current log pi_theta(y_t); kl_logprobs: the pi of A_t and
    the gate (a constant); student_topk_logprobs [..., T, K] (with grad): full-softmax
    log pi_theta at the teacher's top-K ids; teacher_topk_logprobs [..., T, K]: log q there."""
    if pg_form not in PG_FORMS:
        raise ValueError(f"objective.aopd.pg_form: unknown {pg_form!r}; known: {list(PG_FORMS)}")
    maskf = mask.to(logprobs.dtype)
    live = maskf > 0
    adv = masked_where((teacher_logprobs - kl_logprobs).detach(), maskf)
    gate = (live & (teacher_logprobs.exp() - kl_logprobs.detach().exp() <= tau)).to(logprobs.dtype)
    m = live[..., None]
    lq = torch.where(m, teacher_topk_logprobs.to(logprobs.dtype), torch.zeros_like(student_topk_logprobs))
    lp = torch.where(m, student_topk_logprobs, torch.zeros_like(student_topk_logprobs))
    local = (lq.exp() * (lq - lp)).mean(dim=-1)
    if pg_form == "plain":
        pg = masked_where(-adv * logprobs, maskf)
        ratio = torch.ones_like(logprobs)
    else:
        pg, ratio, _ = clipped_pg_per_token(logprobs, old_logprobs, adv, maskf, clip_eps_low,
                                            clip_eps_high)
    per_token = masked_where(gate * local + (1 - gate) * pg, maskf)
    loss = masked_mean(per_token, maskf)
    with torch.no_grad():
        metrics = {"aopd_gate_fraction": masked_mean(gate, maskf),
                   "aopd_local_kl": masked_mean(local, gate * maskf),
                   "aopd_pg": masked_mean(pg, (1 - gate) * maskf),
                   "aopd_advantage_mean": masked_mean(adv, maskf),
                   "ratio_mean": masked_mean(ratio, maskf)}
    return loss, metrics
