"""Sampled-token on-policy distillation (ALGORITHMS.md §1).

k_t = log pi(y_t|c_t) - log q(y_t|c_t) is a one-sample estimate of the per-token reverse KL;
A_t = -lambda * sg(k_t) (optionally a gamma-discounted suffix sum), trained with the clipped
importance-sampled policy gradient of §6 against pi_old (r_d treated by the caller's w_d, M_d).
Which pi enters k_t is a choice:
the current pi_theta recomputed now ("current", most robust under staleness), the behaviour mu
("behaviour": what the rollout engine reported) or pi_old ("old").

Temperatures: `logprobs` (the ratio and its gradient) is at the sampler's temperature, like mu;
k_t and the kl_sample metric compare the student at the teacher's scoring temperature
(`distill_logprobs`) with q (ALGORITHMS.md, conventions). "behaviour" / "old" are recorded at the
sampler's temperature whatever the teacher's.

The discounted returns run over `return_mask` (default: the loss mask): token selection decides
which tokens get a gradient, never the returns of the tokens it keeps (ALGORITHMS.md,
conventions).
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.policy_gradient import clipped_policy_gradient, masked_mean

KL_SOURCES = ("current", "behaviour", "old")


def pick_kl_logprobs(choice: str, logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                     old_logprobs: torch.Tensor | None) -> torch.Tensor:
    """The student log-probs that enter k_t (always a constant: sg)."""
    if choice == "current":
        return logprobs.detach()
    if choice == "behaviour":
        return behaviour_logprobs
    if choice == "old":
        return behaviour_logprobs if old_logprobs is None else old_logprobs
    raise ValueError(f"objective.kl_logprobs: unknown choice {choice!r}; known: {list(KL_SOURCES)}")


def opd_advantages(kl_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, discount: float = 0.0) -> torch.Tensor:
    """A_t = -lambda * sum_{s>=t} gamma^(s-t) m_s k_s (gamma = 0: the token's own k_t). [..., T]."""
    mask = mask.to(kl_logprobs.dtype)
    k = torch.where(mask > 0, (kl_logprobs - teacher_logprobs).detach(), torch.zeros_like(kl_logprobs))
    if discount > 0:
        out = torch.zeros_like(k)
        running = torch.zeros_like(k[..., 0])
        for t in range(k.shape[-1] - 1, -1, -1):
            running = k[..., t] + discount * running
            out[..., t] = running
        k = out
    return -kl_coef * k * mask


def sampled_token_opd_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    kl_logprobs: str = "current",
    discount: float = 0.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    old_logprobs: torch.Tensor | None = None,
    return_mask: torch.Tensor | None = None,
    discrepancy_weight: torch.Tensor | None = None,
    discrepancy_mask: torch.Tensor | None = None,
    dual_clip: float = 0.0,
    distill_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics. logprobs: current student log-probs of the sampled tokens (with grad);
    distill_logprobs: the student's at the teacher's temperature, for k_t ("current") and
    kl_sample (None: logprobs, the temperatures agree);
    behaviour_logprobs: the rollout engine's (mu); old_logprobs: pi_old (defaults to mu).
    return_mask: the tokens whose k_t enter the returns (None: mask; must contain mask);
    discrepancy_weight / discrepancy_mask / dual_clip: the §6 r_d treatment and dual clip."""
    dlp = logprobs if distill_logprobs is None else distill_logprobs
    kl_source = pick_kl_logprobs(kl_logprobs, dlp, behaviour_logprobs, old_logprobs)
    ret_mask = mask if return_mask is None else return_mask
    adv = opd_advantages(kl_source, teacher_logprobs, ret_mask, kl_coef, discount)
    adv = torch.where(mask > 0, adv, torch.zeros_like(adv))  # selected tokens only
    old = behaviour_logprobs if old_logprobs is None else old_logprobs
    loss, metrics = clipped_policy_gradient(logprobs, old, adv, mask, clip_eps_low, clip_eps_high,
                                            discrepancy_weight=discrepancy_weight,
                                            discrepancy_mask=discrepancy_mask, dual_clip=dual_clip)
    with torch.no_grad():
        metrics["kl_sample"] = masked_mean(dlp - teacher_logprobs, mask)
        metrics["mismatch_abs"] = masked_mean((logprobs - behaviour_logprobs).abs(), mask)
        metrics["advantage_mean"] = masked_mean(adv, mask)
        metrics["tokens"] = mask.to(logprobs.dtype).sum()
    return loss, metrics
