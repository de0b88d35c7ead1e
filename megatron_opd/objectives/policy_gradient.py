"""Importance-sampled, clipped policy-gradient loss (ALGORITHMS.md §6).

Loss = -mean_t m_t M_d w_d min(r_s A_t, clip(r_s, 1-eps_low, 1+eps_high) A_t), r_s = pi_theta /
pi_old, with the train-inference discrepancy r_d = pi_old / mu treated by (w_d, M_d)
(objectives/offpolicy.py; w_d = M_d = 1 when untreated). Token-mean over the unmasked tokens of
the batch (tokens M_d drops stay in the count: they contribute 0); an all-masked batch gives
exactly 0.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.offpolicy import decomposed_pg_per_token


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty, never NaN; masked entries get 0 gradient)."""
    mask = mask.to(x.dtype)
    return (torch.where(mask > 0, x, torch.zeros_like(x)) * mask).sum() / mask.sum().clamp_min(1.0)


def masked_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, exactly 0 elsewhere (also in the gradient, even where x is inf/nan)."""
    return torch.where(mask > 0, x, torch.zeros_like(x))


def clipped_pg_per_token(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                         advantages: torch.Tensor, mask: torch.Tensor, eps_low: float,
                         eps_high: float, *, discrepancy_weight: torch.Tensor | None = None,
                         discrepancy_mask: torch.Tensor | None = None, dual_clip: float = 0.0,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-M_d w_d min(r_s A, clip(r_s) A), r_s, clip active) per token; 0 / 1 / 0 on masked
    tokens (`decomposed_pg_per_token`)."""
    return decomposed_pg_per_token(logprobs, old_logprobs, advantages, mask, eps_low=eps_low,
                                   eps_high=eps_high, weight=discrepancy_weight,
                                   keep=discrepancy_mask, dual_clip=dual_clip)


def clipped_policy_gradient(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    *,
    discrepancy_weight: torch.Tensor | None = None,
    discrepancy_mask: torch.Tensor | None = None,
    dual_clip: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, metrics). Inputs are [..., T]; `advantages` and `old_logprobs` are constants.
    `discrepancy_weight` / `discrepancy_mask`: w_d and the tokens M_d keeps (None: untreated)."""
    mask = mask.to(logprobs.dtype)
    per_token, ratio, was_clipped = clipped_pg_per_token(
        logprobs, old_logprobs, advantages, mask, eps_low, eps_high,
        discrepancy_weight=discrepancy_weight, discrepancy_mask=discrepancy_mask,
        dual_clip=dual_clip)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        kept = mask if discrepancy_mask is None else mask * (discrepancy_mask > 0).to(mask.dtype)
        metrics = {
            "clip_fraction": masked_mean(was_clipped, mask),
            # trainable tokens whose r_s still gets a gradient (neither dropped nor clipped)
            "active_fraction": masked_mean(kept - was_clipped, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": masked_where(ratio, mask).max() if mask.numel() else torch.zeros(()),
        }
    return loss, metrics
