"""megatron-opd: asynchronous on-policy distillation and RL for MoE language models."""

__version__ = "0.1.0"
