"""Objectives: pure functions of tensors plus their config section (ALGORITHMS.md)."""

from megatron_opd.objectives.policy_gradient import clipped_policy_gradient, masked_mean
from megatron_opd.objectives.sampled_token_opd import opd_advantages, sampled_token_opd_loss

__all__ = ["clipped_policy_gradient", "masked_mean", "opd_advantages", "sampled_token_opd_loss"]
