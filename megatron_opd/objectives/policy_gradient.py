"""Importance-sampled, clipped policy-gradient loss (ALGORITHMS.md §6).

Loss = -mean_t m_t * min(r_t A_t, clip(r_t, 1-eps_low, 1+eps_high) A_t), r_t = pi_theta / pi_old.
Token-mean over the unmasked tokens of the batch; an all-masked batch gives exactly 0.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty, never NaN; masked entries get 0 gradient)."""
    mask = mask.to(x.dtype)
    return (torch.where(mask > 0, x, torch.zeros_like(x)) * mask).sum() / mask.sum().clamp_min(1.0)


def masked_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, exactly 0 elsewhere (also in the gradient, even where x is inf/nan)."""
    return torch.where(mask > 0, x, torch.zeros_like(x))


def clipped_pg_per_token(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                         advantages: torch.Tensor, mask: torch.Tensor, eps_low: float,
                         eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-min(r A, clip(r) A), r, was_clipped) per token; 0 / 1 / 0 on masked tokens."""
    # Masked positions may hold junk (padding): keep them out of exp() so they stay finite.
    log_ratio = masked_where(logprobs - old_logprobs.detach(), mask)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = masked_where(-torch.minimum(unclipped, clipped), mask)
    return per_token, ratio, (clipped < unclipped).to(logprobs.dtype).detach()


def clipped_policy_gradient(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, metrics). Inputs are [..., T]; `advantages` and `old_logprobs` are constants."""
    mask = mask.to(logprobs.dtype)
    per_token, ratio, was_clipped = clipped_pg_per_token(logprobs, old_logprobs, advantages, mask,
                                                         eps_low, eps_high)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean(was_clipped, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": masked_where(ratio, mask).max() if mask.numel() else torch.zeros(()),
        }
    return loss, metrics
