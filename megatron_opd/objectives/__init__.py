"""Objectives: pure functions of tensors plus their config section (ALGORITHMS.md)."""

from megatron_opd.objectives.compose import NEEDS_TOPK, TERMS, ObjectiveInputs, objective_loss
from megatron_opd.objectives.policy_gradient import clipped_policy_gradient, masked_mean
from megatron_opd.objectives.sampled_token_opd import opd_advantages, sampled_token_opd_loss

__all__ = ["NEEDS_TOPK", "TERMS", "ObjectiveInputs", "clipped_policy_gradient", "masked_mean",
           "objective_loss", "opd_advantages", "sampled_token_opd_loss"]
