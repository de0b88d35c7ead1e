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
    # Masked positions may hold junk (padding): keep them out of exp() so they stay finite.
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        was_clipped = (clipped < unclipped).to(mask.dtype)
        metrics = {
            "clip_fraction": masked_mean(was_clipped, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max()
            if mask.numel() else torch.zeros(()),
        }
    return loss, metrics
