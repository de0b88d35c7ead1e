"""Objectives: pure functions of tensors plus their config section (ALGORITHMS.md).

The package imports no torch by itself (the config validates term names from `names`); the loss
functions live in their modules (`compose.objective_loss` is the entry point)."""

from megatron_opd.objectives.names import NEEDS_TOPK, PG_TERMS, TERMS

__all__ = ["NEEDS_TOPK", "PG_TERMS", "TERMS"]
