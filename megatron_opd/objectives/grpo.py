"""GRPO + OPD in one objective (ALGORITHMS.md §5, [design]).

    Â_t = A_i^GRPO + λ·(log q(y_t) − log π(y_t)),   A_i^GRPO = (r_i − mean_g r) / (std_g r + eps)

The group statistics need every sample of a group, so `group_normalized_advantages` runs on the
whole batch before it is split over data-parallel ranks and micro-batches (the collate step); the
loss then sees A_i^GRPO as a per-sample constant.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.policy_gradient import clipped_policy_gradient, masked_mean


def group_normalized_advantages(rewards: torch.Tensor, group_index: torch.Tensor,
                                eps: float = 1e-6, scale_by_std: bool = True) -> torch.Tensor:
    """[B] rewards, [B] group index (any integers) -> [B] float advantages.
    std is the population std of the group (a group of one sample, or one whose rewards are all
    equal, gets advantage 0: there is nothing to compare against)."""
    r = rewards.to(torch.float64)
    _, inverse = torch.unique(group_index, return_inverse=True)
    g = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(g, dtype=r.dtype).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(g, dtype=r.dtype).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    if scale_by_std:
        var = torch.zeros(g, dtype=r.dtype).index_add_(0, inverse, centred ** 2) / count
        std = var.sqrt()[inverse]
        # equal rewards (std 0) carry no signal: advantage 0, never 0/0
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def grpo_opd_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, kl_logprobs: torch.Tensor,
                  teacher_logprobs: torch.Tensor, sample_advantages: torch.Tensor,
                  mask: torch.Tensor, *, kl_coef: float, clip_eps_low: float,
                  clip_eps_high: float, discrepancy_weight: torch.Tensor | None = None,
                  discrepancy_mask: torch.Tensor | None = None, dual_clip: float = 0.0,
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logprobs [..., T] (with grad); kl_logprobs: the π entering the OPD term (§1 choice);
    sample_advantages [...]: A_i^GRPO per sample, broadcast over its tokens;
    discrepancy_weight / discrepancy_mask / dual_clip: the §6 r_d treatment and dual clip."""
    mask_f = mask.to(logprobs.dtype)
    dense = torch.where(mask_f > 0, (teacher_logprobs - kl_logprobs).detach(),
                        torch.zeros_like(logprobs))
    adv = (sample_advantages.detach().to(logprobs.dtype).unsqueeze(-1) + kl_coef * dense) * mask_f
    loss, metrics = clipped_policy_gradient(logprobs, old_logprobs, adv, mask, clip_eps_low,
                                            clip_eps_high, discrepancy_weight=discrepancy_weight,
                                            discrepancy_mask=discrepancy_mask, dual_clip=dual_clip)
    with torch.no_grad():
        metrics["grpo_advantage_mean"] = masked_mean(
            sample_advantages.to(logprobs.dtype).unsqueeze(-1).expand_as(logprobs), mask)
        metrics["opd_term_mean"] = masked_mean(kl_coef * dense, mask)
    return loss, metrics
