"""vOPD: on-policy distillation with a closed-form control-variate baseline (ALGORITHMS.md §4).

The value of a prefix under the OPD return -k is V(c_t) = -KL(pi_theta || q)(c_t), known in
closed form, so the advantage
    A_t = lambda * sg(log q(y_t) - log pi(y_t) + KL_t)
is unbiased with lower variance than -lambda*k_t. KL_t is exact over the full vocabulary (needs the
teacher's whole distribution: `vocab_parallel_reverse_kl`) or, in the top-k form, the renormalised
reverse KL on the teacher's top-K support (`lsm.renormalised_topk_reverse_kl`). With
teacher.signal=hidden KL_t is always the exact one, from the teacher's hidden states
(learner/hidden_teacher.py), whatever vopd.support says. Trained with the clipped §6 loss.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.policy_gradient import clipped_policy_gradient, masked_mean, masked_where

SUPPORTS = ("topk", "full")


def vopd_loss(logprobs: torch.Tensor, kl_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
              teacher_logprobs: torch.Tensor, closed_form_kl: torch.Tensor, mask: torch.Tensor, *,
              kl_coef: float = 1.0, clip_eps_low: float = 0.2, clip_eps_high: float = 0.28,
              discrepancy_weight: torch.Tensor | None = None,
              discrepancy_mask: torch.Tensor | None = None, dual_clip: float = 0.0,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """closed_form_kl [..., T]: KL_t (a constant). kl_logprobs: the pi in log q - log pi.
    discrepancy_weight / discrepancy_mask / dual_clip: the §6 r_d treatment and dual clip."""
    maskf = mask.to(logprobs.dtype)
    adv = kl_coef * masked_where((teacher_logprobs - kl_logprobs + closed_form_kl).detach(), maskf)
    loss, metrics = clipped_policy_gradient(logprobs, old_logprobs, adv, maskf, clip_eps_low,
                                            clip_eps_high, discrepancy_weight=discrepancy_weight,
                                            discrepancy_mask=discrepancy_mask, dual_clip=dual_clip)
    with torch.no_grad():
        metrics["vopd_closed_form_kl"] = masked_mean(closed_form_kl, maskf)
        metrics["vopd_baseline_var_ratio"] = _variance_ratio(
            adv, kl_coef * masked_where(teacher_logprobs - kl_logprobs, maskf), maskf)
    return loss, metrics


def _variance_ratio(with_baseline: torch.Tensor, without: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Var(A with baseline) / Var(A without) over the unmasked tokens (the baseline's point)."""
    def var(x):
        mean = masked_mean(x, mask)
        return masked_mean((x - mean) ** 2, mask)
    den = var(without)
    return var(with_baseline) / den if den > 0 else torch.zeros_like(den)
